-- How many times a process was put back by the claim to wait for what it needs (a host to be
-- placed on, its agent's activation) without running: such waits back off like attempts but
-- are not attempts, so they do not count against process.max_attempts (execution_count).
ALTER TABLE process_instance ADD COLUMN wait_count BIGINT NOT NULL DEFAULT 0;
