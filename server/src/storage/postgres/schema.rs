//! The relay's tables in PostgreSQL, versioned: each migration runs once, in order, in
//! one transaction under an advisory lock, so relays starting together do not race.
//!
//! The SQL keeps to what Postgres-compatible distributed engines (CockroachDB,
//! YugabyteDB) also run: plain tables with primary keys, `bytea`, `bigint`,
//! `ON CONFLICT`, no stored procedures, no triggers. Differences are named in
//! DEPLOYMENT.md.

/// The schema version this build writes and reads.
pub const VERSION: i32 = 2;

/// Key of the advisory lock migrations run under ("redline" in ASCII, as a number).
pub const MIGRATION_LOCK: i64 = 0x0072_6564_6c69_6e65;

/// The channel on which a flush that appended announces the feed's new head.
pub const FEED_CHANNEL: &str = "redline_feed";

/// Migration `n` (1-based) brings the schema from version `n - 1` to `n`.
pub const MIGRATIONS: &[&str] = &[
    // 1: documents and the feed, uploads, actors, devices, quarantine.
    r#"
    CREATE TABLE redline_meta (
        key text PRIMARY KEY,
        value bigint NOT NULL
    );
    -- The feed's head: one row. Every commit transaction updates it, so commits take
    -- sequence numbers in the order they commit (see ARCHITECTURE.md, "the feed on
    -- PostgreSQL").
    CREATE TABLE redline_feed_head (
        one boolean PRIMARY KEY DEFAULT true CHECK (one),
        seq bigint NOT NULL
    );
    INSERT INTO redline_feed_head (one, seq) VALUES (true, 0);
    CREATE TABLE redline_docs (
        doc text COLLATE "C" PRIMARY KEY,
        snapshot bytea
    );
    CREATE TABLE redline_chunks (
        doc text COLLATE "C" NOT NULL,
        seq bigint NOT NULL,
        chunk bytea NOT NULL,
        PRIMARY KEY (doc, seq)
    );
    CREATE TABLE redline_feed (
        seq bigint PRIMARY KEY,
        doc text COLLATE "C" NOT NULL,
        heads bytea NOT NULL
    );
    CREATE INDEX redline_feed_by_doc ON redline_feed (doc, seq);
    CREATE TABLE redline_uploads (
        key bytea PRIMARY KEY,
        touched bigint
    );
    CREATE TABLE redline_upload_pieces (
        key bytea NOT NULL,
        at bigint NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (key, at)
    );
    CREATE TABLE redline_actors (
        actor bytea PRIMARY KEY,
        device text NOT NULL
    );
    CREATE INDEX redline_actors_by_device ON redline_actors (device);
    CREATE TABLE redline_devices (
        device text COLLATE "C" PRIMARY KEY,
        record bytea NOT NULL
    );
    CREATE TABLE redline_quarantine (
        key bytea PRIMARY KEY,
        item bytea NOT NULL
    );
    "#,
    // 2: several relays over one database. Each document knows its last commit (the
    // optimistic check of a relay that appends) and what its snapshot covers (a
    // compaction never drops another relay's newer chunks, nor replaces a newer
    // snapshot).
    r#"
    ALTER TABLE redline_docs ADD COLUMN last_seq bigint NOT NULL DEFAULT 0;
    ALTER TABLE redline_docs ADD COLUMN snapshot_seq bigint NOT NULL DEFAULT 0;
    UPDATE redline_docs d SET last_seq = COALESCE(
        (SELECT max(f.seq) FROM redline_feed f WHERE f.doc = d.doc), 0);
    UPDATE redline_docs d SET snapshot_seq = COALESCE(
        (SELECT min(c.seq) - 1 FROM redline_chunks c WHERE c.doc = d.doc), d.last_seq)
        WHERE d.snapshot IS NOT NULL;
    "#,
];
