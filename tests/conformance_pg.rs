//! The conformance suite on Postgres: the same cases as `conformance_fake.rs`.

postbox::testkit::conformance_tests!(postbox::testkit::conformance::PgHarness::new());

#[test]
fn the_suite_has_at_least_40_cases() {
    assert!(CONFORMANCE_CASES.len() >= 40, "{}", CONFORMANCE_CASES.len());
}
