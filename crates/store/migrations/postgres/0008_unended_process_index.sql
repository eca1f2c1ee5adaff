-- The claim's "only the oldest unended process of a resource" test probes this index, whatever
-- the planner believes about how many processes are unended (with stale statistics it once
-- compared every unended process with every other one).
CREATE INDEX idx_process_instance_unended_resource
    ON process_instance(resource_type, resource_id, id) WHERE end_time IS NULL;
