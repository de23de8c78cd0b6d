//! The command line as an operator meets it: each command takes the flags it reads and refuses
//! the rest with one line, before it starts anything.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_bazaar");

/// Runs `bazaar ARGS` on a data directory of its own, with no `BAZAAR_*` variable of the
/// caller's; gives up (and kills it) after 20 s. Returns (exited in time with success, stderr).
fn bazaar(args: &[&str]) -> (Option<bool>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(BIN);
    cmd.arg("--data").arg(dir.path().join("data")).args(args);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("BAZAAR_")) {
        cmd.env_remove(name);
    }
    let stderr = dir.path().join("stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("run bazaar");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status.success());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&stderr).unwrap_or_default())
}

#[test]
fn a_command_refuses_a_flag_it_does_not_read() {
    for args in [
        &["audit", "--smtp", "mail.example.com:25"][..],
        &["dlq", "list", "--saga-step-timeout-ms", "200"],
        &["mesh", "show", "--trusted-ips", "10.0.0.1"],
        &["contracts", "asyncapi", "--broker", "nats://127.0.0.1:4222"],
    ] {
        let flag = args.iter().find(|a| a.starts_with("--")).expect("a flag");
        let (status, stderr) = bazaar(args);
        assert_eq!(status, Some(false), "`bazaar {}` ran: {stderr}", args.join(" "));
        assert!(stderr.contains(flag), "`bazaar {}`: {stderr}", args.join(" "));
    }
}

#[test]
fn serving_a_role_refuses_another_roles_setting_and_names_whose_it_is() {
    let (status, stderr) = bazaar(&["serve", "orders", "--smtp", "mail.example.com:25"]);
    assert_eq!(status, Some(false), "orders started with --smtp: {stderr}");
    let line = stderr.trim();
    assert!(
        line.lines().count() == 1 && line.contains("--smtp") && line.contains("notifications"),
        "{line}"
    );
}

#[test]
fn a_role_lists_its_own_settings_under_its_name_in_help() {
    let out = Command::new(BIN).args(["serve", "--help"]).output().expect("help");
    let help = String::from_utf8_lossy(&out.stdout);
    for heading in ["Orders:", "Notifications:", "Gateway:"] {
        assert!(help.contains(heading), "no {heading} section in\n{help}");
    }
    let audit = Command::new(BIN).args(["audit", "--help"]).output().expect("help");
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(!audit.contains("--smtp"), "audit offers --smtp:\n{audit}");
}
