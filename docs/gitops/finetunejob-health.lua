-- Argo CD health check for kubetune.io/FineTuneJob (resource.customizations.health.kubetune.io_FineTuneJob).
--
-- The status follows kstatus: status.observedGeneration, and Ready / Reconciling / Stalled conditions, plus
-- Running, Succeeded, Failed and Suspended, exactly one of which is True once the operator has seen the job
-- (status.phase names it). Like Argo CD's check for batch/v1 Job:
--   Healthy      the current run succeeded
--   Degraded     the current run failed (restarts used up, budget or deadline exceeded, eval gate failed, ...)
--   Suspended    spec.runPolicy.suspend is set and the workers have stopped
--   Progressing  otherwise: pending, training, backing off, suspending, or a spec change the operator has not
--                acted on yet (observedGeneration behind metadata.generation), so health never reports the
--                previous run's result for a new spec
-- Written for Argo CD's Lua (gopher-lua, Lua 5.1, no standard libraries needed).

local hs = {status = "Progressing", message = "Waiting for the kubetune operator"}

if obj.metadata ~= nil and obj.metadata.deletionTimestamp ~= nil then
  hs.message = "Pending deletion"
  return hs
end

local status = obj.status
if status == nil or status.observedGeneration == nil then
  return hs
end
if obj.metadata.generation ~= nil and status.observedGeneration < obj.metadata.generation then
  hs.message = "The operator has not yet acted on generation " .. tostring(obj.metadata.generation)
  return hs
end

local conditions = {}
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    conditions[condition.type] = condition
  end
end

local function isTrue(type)
  return conditions[type] ~= nil and conditions[type].status == "True"
end

local function messageOf(type, fallback)
  local condition = conditions[type]
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    return condition.message
  end
  return fallback
end

-- The same order as the operator's phase: Succeeded, Failed, Suspended, Running, else Pending.
if isTrue("Succeeded") then
  hs.status = "Healthy"
  hs.message = messageOf("Succeeded", "Succeeded")
elseif isTrue("Failed") or isTrue("Stalled") then
  hs.status = "Degraded"
  hs.message = messageOf("Failed", messageOf("Stalled", "Failed"))
elseif isTrue("Suspended") and not isTrue("Reconciling") then
  hs.status = "Suspended"
  hs.message = messageOf("Suspended", "Suspended")
else
  -- Pending or Running, or suspending while the workers still checkpoint and stop: the Reconciling condition
  -- carries the message ("all 2 workers running", "attempt 2 starts after a 30s backoff", ...).
  hs.message = messageOf("Reconciling", messageOf("Ready", status.phase or hs.message))
end
return hs
