//! The conformance suite on the in-memory `FakeBroker`.

postbox::testkit::conformance_tests!(postbox::testkit::conformance::FakeHarness::new());

#[test]
fn the_suite_has_at_least_40_cases() {
    assert!(CONFORMANCE_CASES.len() >= 40, "{}", CONFORMANCE_CASES.len());
}
