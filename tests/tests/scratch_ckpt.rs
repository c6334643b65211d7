use quicksilver_tests::*;
use std::time::Duration;
#[test]
fn scratch() {
    let script = std::env::var("QS_SCRATCH").unwrap();
    let machine = guest("scratch", 2).timeout(Duration::from_secs(120));
    let out = run(machine, &script);
    println!("{}", out.script_output());
}
