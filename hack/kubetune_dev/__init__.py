"""Development and test tooling for kubetune: the local control plane, its toolchain, and the
local node agent. Not shipped with kubetune and not meant for production clusters."""
