-- External handlers (the original's extension point): while active, the engine calls
-- `<process>;handler=<name>` for the processes named in data.processConfigs, in priority order.
-- priority, retries, timeoutMillis and processConfigs live in data, as for the other kinds.
CREATE TABLE external_handler (
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

CREATE INDEX idx_external_handler_account ON external_handler(account_id);
CREATE INDEX idx_external_handler_state ON external_handler(state);
