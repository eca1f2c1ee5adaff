-- The containers a service keeps: each is created in a numbered slot (`<service>-<n>`, n from 1
-- to the service's scale). At most one live (not removed) container holds a slot, so two
-- reconcile passes that overlap (a node that lost the leader duty and the node that took it)
-- can never run more containers than the scale: the second create of a slot fails here.
ALTER TABLE instance ADD COLUMN service_index BIGINT;

CREATE UNIQUE INDEX idx_instance_service_slot ON instance(service_id, service_index)
    WHERE removed IS NULL AND service_index IS NOT NULL;
