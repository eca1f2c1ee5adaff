-- Idempotency keys of creates (`Idempotency-Key` header): one row per account and key, written
-- in the transaction that creates the resource, so a retry finds it or finds nothing was created.
-- No foreign key: table.cleanup deletes agents' accounts, and keys by age alone.
CREATE TABLE idempotency_key (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL,
    idem_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id BIGINT NOT NULL,
    created BIGINT NOT NULL,
    UNIQUE (account_id, idem_key)
);

CREATE INDEX idx_idempotency_key_created ON idempotency_key(created);
