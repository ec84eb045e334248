-- Retention deletes audit rows by age: without this index each prune scans the table.
CREATE INDEX audit_log_by_time ON audit_log (at_ms);
