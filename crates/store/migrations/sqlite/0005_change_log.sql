-- The resumable change stream: every published `resource.change`, in stream order. position is
-- gap-free and cluster-wide: each batch takes MAX(position) + 1… while it holds the write lock
-- (SQLite has one writer; PostgreSQL takes an advisory lock), so positions commit in order.
-- data is the event's JSON without its position. Trimmed to the newest
-- `resource.change.retain.count` positions by the insert itself.
CREATE TABLE change_log (
    position INTEGER PRIMARY KEY,
    time BIGINT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id BIGINT NOT NULL,
    account_id BIGINT,
    data TEXT NOT NULL
);

CREATE INDEX idx_change_log_account ON change_log(account_id, position);
