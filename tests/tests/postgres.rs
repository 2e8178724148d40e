//! The relay on a real PostgreSQL, started by the test in a temporary directory.

use std::collections::HashMap;

use redline_server::storage::conformance::{self, Harness};
use redline_server::storage::{Documents, PgOptions, PgStorage};
use redline_tests::postgres::TestPostgres;

/// Every store gets a database of its own; a restart connects again to the same one.
struct Postgres<'a> {
    pg: &'a TestPostgres,
    urls: HashMap<u64, String>,
}

impl Harness for Postgres<'_> {
    type Store = PgStorage;
    fn fresh(&mut self) -> PgStorage {
        let url = self.pg.fresh_database().expect("a new database");
        let s = PgStorage::connect(&PgOptions::new(url.clone())).expect("connect");
        self.urls.insert(s.epoch(), url);
        s
    }
    fn restart(&mut self, store: PgStorage) -> PgStorage {
        let url = self.urls[&store.epoch()].clone();
        // Dropping the store closes its connections: the server rolls back whatever
        // was not flushed, as a relay process that died would leave it.
        drop(store);
        PgStorage::connect(&PgOptions::new(url)).expect("connect again")
    }
}

#[test]
fn postgres_keeps_the_storage_contract() {
    let Some(pg) = TestPostgres::start_or_skip("postgres_keeps_the_storage_contract") else {
        return;
    };
    conformance::run(&mut Postgres {
        pg: &pg,
        urls: HashMap::new(),
    });
}
