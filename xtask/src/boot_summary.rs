//! The one line the interactive demo shows for the whole boot (the boot itself goes to the
//! log): which kernel, how long it took, and what became of Quicksilver's agent. A refused load
//! brings the agent's own reasons (its `quicksilver:` kernel lines), since that is what the user
//! must act on.

use std::path::Path;

/// The summary of a boot whose console (up to `/init`'s `QS-BOOTED`) is `console`, which took
/// `seconds`; `log` is where the whole boot was kept.
pub fn boot_summary(console: &str, seconds: f64, log: &Path) -> String {
    let kernel = console
        .lines()
        .find_map(|l| l.split("Linux version ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or("the kernel");
    let marker = |m: &str| console.lines().find(|l| l.trim_start().starts_with(m));
    let agent = if marker("QS-LOADED").is_some() {
        "Quicksilver's agent is loaded, the hv dormant (qsctl status)".to_string()
    } else if marker("QS-NOLOAD").is_some() {
        "Quicksilver's agent not loaded (--noload)".to_string()
    } else if let Some(failed) = marker("QS-LOAD-FAILED") {
        let reasons: Vec<&str> = console
            .lines()
            .filter_map(|l| l.split_once("quicksilver: ").map(|(_, why)| why.trim_end()))
            .filter(|why| !why.contains("taints kernel"))
            .collect();
        let failed = failed.trim().trim_start_matches("QS-LOAD-FAILED: ");
        if reasons.is_empty() {
            format!("Quicksilver's agent did not load: {failed}")
        } else {
            format!("Quicksilver's agent did not load: {}", reasons.join("; "))
        }
    } else {
        "no word from /init on the agent".to_string()
    };
    format!(
        "xtask: Linux {kernel} booted in {seconds:.1} s; {agent}. The boot's console: {}",
        log.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: &str = "[    0.000000] Linux version 6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) (gcc-12)\r\n\
        [    0.5] smpboot: Total of 4 processors activated\r\n";

    #[test]
    fn a_boot_with_the_agent_says_the_kernel_the_time_and_dormant() {
        let s = boot_summary(
            &format!("{BOOT}QS-INIT\r\nQS-LOADED\r\n"),
            2.44,
            Path::new("target/qs/logs/demo.log"),
        );
        assert_eq!(
            s,
            "xtask: Linux 6.1.0-57-cloud-amd64 booted in 2.4 s; Quicksilver's agent is loaded, the hv dormant (qsctl status). The boot's console: target/qs/logs/demo.log"
        );
    }

    #[test]
    fn a_refused_load_brings_the_agents_reasons() {
        let console = format!(
            "{BOOT}[ 3.1] quicksilver: loading out-of-tree module taints kernel.\r\n\
             [ 3.2] quicksilver: refusing to load: this CPU has no AMD SVM: Quicksilver needs AMD-V\r\n\
             QS-LOAD-FAILED: insmod exited with 1 (see dmesg)\r\n"
        );
        let s = boot_summary(&console, 3.0, Path::new("demo.log"));
        assert!(
            s.contains(
                "did not load: refusing to load: this CPU has no AMD SVM: Quicksilver needs AMD-V."
            ),
            "{s}"
        );
        assert!(!s.contains("taints"), "{s}");
        let bare = boot_summary(
            &format!("{BOOT}QS-LOAD-FAILED: insmod exited with 1 (see dmesg)\r\n"),
            3.0,
            Path::new("demo.log"),
        );
        assert!(
            bare.contains("did not load: insmod exited with 1"),
            "{bare}"
        );
    }
}
