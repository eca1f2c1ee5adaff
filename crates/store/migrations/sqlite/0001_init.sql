-- drover's initial schema. Table and column names follow the original where it had them;
-- times are epoch milliseconds (BIGINT), JSON documents are TEXT, so both stores share SQL.

CREATE TABLE account (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    description TEXT,
    state TEXT NOT NULL,
    created BIGINT NOT NULL,
    removed BIGINT,
    remove_time BIGINT,
    data TEXT,
    project_id BIGINT REFERENCES account(id),
    agent_id BIGINT,
    external_id TEXT
);

CREATE TABLE credential (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    description TEXT,
    state TEXT NOT NULL,
    created BIGINT NOT NULL,
    removed BIGINT,
    remove_time BIGINT,
    data TEXT,
    account_id BIGINT NOT NULL REFERENCES account(id),
    public_value TEXT NOT NULL,
    secret_value TEXT NOT NULL,
    registry_id BIGINT
);

CREATE TABLE setting (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    value TEXT NOT NULL
);

CREATE TABLE agent (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    description TEXT,
    state TEXT NOT NULL,
    created BIGINT NOT NULL,
    removed BIGINT,
    remove_time BIGINT,
    data TEXT,
    transitioning_message TEXT,
    transitioning_progress INTEGER,
    transitioning TEXT NOT NULL DEFAULT 'no',
    account_id BIGINT REFERENCES account(id),
    uri TEXT,
    managed_config INTEGER NOT NULL DEFAULT 1,
    zone_id BIGINT,
    external_id TEXT,
    last_ping BIGINT
);

CREATE TABLE host (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    description TEXT,
    state TEXT NOT NULL,
    created BIGINT NOT NULL,
    removed BIGINT,
    remove_time BIGINT,
    data TEXT,
    transitioning_message TEXT,
    transitioning_progress INTEGER,
    transitioning TEXT NOT NULL DEFAULT 'no',
    account_id BIGINT REFERENCES account(id),
    agent_id BIGINT REFERENCES agent(id),
    hostname TEXT,
    external_id TEXT
);

CREATE TABLE stack (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    description TEXT,
    state TEXT NOT NULL,
    created BIGINT NOT NULL,
    removed BIGINT,
    remove_time BIGINT,
    data TEXT,
    transitioning_message TEXT,
    transitioning_progress INTEGER,
    transitioning TEXT NOT NULL DEFAULT 'no',
    account_id BIGINT REFERENCES account(id),
    external_id TEXT
);

CREATE TABLE service (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    description TEXT,
    state TEXT NOT NULL,
    created BIGINT NOT NULL,
    removed BIGINT,
    remove_time BIGINT,
    data TEXT,
    transitioning_message TEXT,
    transitioning_progress INTEGER,
    transitioning TEXT NOT NULL DEFAULT 'no',
    account_id BIGINT REFERENCES account(id),
    stack_id BIGINT REFERENCES stack(id),
    scale INTEGER,
    external_id TEXT
);

CREATE TABLE instance (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    description TEXT,
    state TEXT NOT NULL,
    created BIGINT NOT NULL,
    removed BIGINT,
    remove_time BIGINT,
    data TEXT,
    transitioning_message TEXT,
    transitioning_progress INTEGER,
    transitioning TEXT NOT NULL DEFAULT 'no',
    account_id BIGINT REFERENCES account(id),
    host_id BIGINT REFERENCES host(id),
    agent_id BIGINT REFERENCES agent(id),
    service_id BIGINT REFERENCES service(id),
    external_id TEXT
);

CREATE TABLE volume (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    description TEXT,
    state TEXT NOT NULL,
    created BIGINT NOT NULL,
    removed BIGINT,
    remove_time BIGINT,
    data TEXT,
    transitioning_message TEXT,
    transitioning_progress INTEGER,
    transitioning TEXT NOT NULL DEFAULT 'no',
    account_id BIGINT REFERENCES account(id),
    host_id BIGINT REFERENCES host(id),
    instance_id BIGINT REFERENCES instance(id),
    external_id TEXT
);

CREATE TABLE process_instance (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    start_time BIGINT,
    end_time BIGINT,
    data TEXT,
    priority INTEGER NOT NULL DEFAULT 0,
    process_name TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id BIGINT NOT NULL,
    result TEXT,
    exit_reason TEXT,
    phase TEXT,
    start_process_server_id TEXT,
    running_process_server_id TEXT,
    execution_count BIGINT NOT NULL DEFAULT 0,
    run_after BIGINT,
    account_id BIGINT,
    lease_expires BIGINT,
    created BIGINT NOT NULL,
    last_error TEXT
);

CREATE TABLE process_execution (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    process_instance_id BIGINT NOT NULL REFERENCES process_instance(id),
    uuid TEXT NOT NULL,
    log TEXT,
    created BIGINT NOT NULL,
    started BIGINT,
    ended BIGINT,
    exit_reason TEXT,
    message TEXT
);

CREATE TABLE container_event (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT REFERENCES account(id),
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    created BIGINT NOT NULL,
    data TEXT,
    external_id TEXT,
    external_status TEXT,
    external_from TEXT,
    external_timestamp BIGINT,
    reported_host_uuid TEXT,
    host_id BIGINT REFERENCES host(id)
);

CREATE TABLE service_event (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT,
    kind TEXT NOT NULL,
    uuid TEXT NOT NULL,
    description TEXT,
    state TEXT NOT NULL,
    created BIGINT NOT NULL,
    removed BIGINT,
    remove_time BIGINT,
    data TEXT,
    account_id BIGINT REFERENCES account(id),
    host_id BIGINT REFERENCES host(id),
    healthcheck_uuid TEXT,
    instance_id BIGINT REFERENCES instance(id),
    healthcheck_instance_id BIGINT,
    reported_health TEXT,
    external_timestamp BIGINT
);

CREATE UNIQUE INDEX idx_account_uuid ON account(uuid);
CREATE UNIQUE INDEX idx_credential_public_value ON credential(public_value);
CREATE INDEX idx_credential_account ON credential(account_id);
CREATE INDEX idx_agent_account ON agent(account_id);
CREATE INDEX idx_host_account ON host(account_id);
CREATE INDEX idx_instance_account ON instance(account_id);
CREATE INDEX idx_instance_host ON instance(host_id);
CREATE INDEX idx_volume_account ON volume(account_id);
CREATE INDEX idx_service_account ON service(account_id);
CREATE INDEX idx_stack_account ON stack(account_id);
CREATE INDEX idx_process_instance_pending ON process_instance(run_after) WHERE end_time IS NULL;
CREATE INDEX idx_process_instance_resource ON process_instance(resource_type, resource_id);
CREATE INDEX idx_process_instance_end ON process_instance(end_time);
CREATE INDEX idx_process_execution_instance ON process_execution(process_instance_id);
CREATE INDEX idx_container_event_created ON container_event(created);
CREATE INDEX idx_container_event_host_state ON container_event(host_id, state);
CREATE INDEX idx_service_event_created ON service_event(created);
CREATE INDEX idx_process_instance_name ON process_instance(process_name);
CREATE INDEX idx_instance_state ON instance(state);
CREATE INDEX idx_volume_host ON volume(host_id);
CREATE INDEX idx_host_agent ON host(agent_id);
