//! Self-virtualization end to end: a dormant hv, then many round trips into and out of guest
//! mode on every CPU while a self-verifying workload runs, with proof on each CPU each time
//! (the scenario: `tests/src/scenarios.rs`).

use quicksilver_tests::*;

#[test]
fn round_trips_smp1() {
    scenarios::round_trips(&artifacts(), "switch-smp1", 1, 200);
}

#[test]
fn round_trips_smp2() {
    scenarios::round_trips(&artifacts(), "switch-smp2", 2, 200);
}

#[test]
fn round_trips_smp4() {
    scenarios::round_trips(&artifacts(), "switch-smp4", 4, 200);
}
