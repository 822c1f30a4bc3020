-- The application schema of tests/test_attr.rs, run on each Postgres fixture before the test.
CREATE TABLE orders (
    id bigint PRIMARY KEY,
    total_cents bigint NOT NULL
);
