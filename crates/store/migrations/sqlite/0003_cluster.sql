-- The nodes of a cluster (several servers on one PostgreSQL; a single server has one row too).
-- A node renews lease_until every heartbeat; a node whose lease ran out is dead. epoch grows
-- each time the node (re)joins, and fences what it writes for its duties.
CREATE TABLE cluster_node (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    address TEXT NOT NULL,
    nats BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    lease_until BIGINT NOT NULL,
    state TEXT NOT NULL
);

-- Facts shared by the nodes of one database: the cluster id that prefixes its NATS subjects.
CREATE TABLE cluster_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Leases of the once-per-cluster duties (the leader: clean-up, ping monitor, event worker).
CREATE TABLE cluster_duty (
    name TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    lease_until BIGINT NOT NULL,
    acquired_at BIGINT NOT NULL
);

-- One row per run of a periodic task, by the node (and epoch) that ran it.
CREATE TABLE cluster_task_run (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task TEXT NOT NULL,
    node TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    at BIGINT NOT NULL
);

CREATE INDEX idx_cluster_task_run_at ON cluster_task_run(at);

-- Which node each connected agent's socket is on.
CREATE TABLE agent_session (
    agent_id BIGINT NOT NULL,
    node TEXT NOT NULL,
    since BIGINT NOT NULL,
    PRIMARY KEY (agent_id, node)
);

CREATE INDEX idx_process_instance_server ON process_instance(running_process_server_id) WHERE running_process_server_id IS NOT NULL;
