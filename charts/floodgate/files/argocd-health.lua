-- Argo CD health of every Floodgate resource (AIProviderPool, TierQueue, CachePolicy,
-- LocalModelDeployment, Tenant, RoutingPolicy), from the conditions the operator writes:
--   no status yet, or status.observedGeneration behind metadata.generation -> Progressing;
--   Degraded=True                            -> Degraded (some capacity or keys missing);
--   Ready=True and Progressing=True          -> Progressing (a model rolling out or scaling);
--   Ready=True                               -> Healthy;
--   Ready=False and Progressing=True         -> Progressing;
--   Ready=False, reason ScaledToZero         -> Suspended;
--   Ready=False otherwise                    -> Degraded (the message names the Secret/key).
-- Install: argocd-cm `resource.customizations.health.floodgate.dev_<Kind>` (see the chart's
-- README section "Argo CD"). Tested by e2e/tests/chart_argocd.rs against the operator's own
-- status output.
local hs = { status = "Progressing", message = "Waiting for the Floodgate operator" }
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local found = {}
for _, c in ipairs(obj.status.conditions) do
  found[c.type] = c
end
local ready, degraded, progressing = found["Ready"], found["Degraded"], found["Progressing"]
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = degraded.message
  return hs
end
if ready == nil then
  return hs
end
if ready.status == "True" then
  if progressing ~= nil and progressing.status == "True" then
    hs.message = progressing.message
    return hs
  end
  hs.status = "Healthy"
  hs.message = ready.message
  return hs
end
if progressing ~= nil and progressing.status == "True" then
  hs.message = progressing.message
  return hs
end
if ready.reason == "ScaledToZero" then
  hs.status = "Suspended"
else
  hs.status = "Degraded"
end
hs.message = ready.message
return hs
