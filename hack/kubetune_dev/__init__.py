"""Development and test tooling for kubetune: the local control plane, its toolchain, the images built from the
Dockerfile and the real nodes that run them. Not shipped with kubetune and not meant for production clusters."""
