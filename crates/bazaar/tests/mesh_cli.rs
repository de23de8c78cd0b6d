//! `bazaar mesh` as an operator runs it: init, show, issue a tool's certificate, rotate; and
//! the one-line errors when something is missing or wrong.

use std::{path::Path, process::Command};

use bazaar_kit::mesh::{MeshFiles, Tls};

const BIN: &str = env!("CARGO_BIN_EXE_bazaar");

fn mesh(data: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("--data")
        .arg(data)
        .arg("mesh")
        .args(args)
        .output()
        .expect("run bazaar");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_operator_creates_the_ca_issues_a_tool_certificate_and_rotates_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    let (ok, _, err) = mesh(&data, &["issue", "curl"]);
    assert!(!ok, "issued without a CA");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("bazaar mesh init"), "{err}");

    let (ok, out, err) = mesh(&data, &["init", "--trust-domain", "shop.example"]);
    assert!(ok, "{err}");
    assert!(out.contains("created") && out.contains("shop.example"), "{out}");
    let (ok, out, _) = mesh(&data, &["init", "--trust-domain", "shop.example"]);
    assert!(ok && out.contains("already there"), "{out}");
    let (ok, _, err) = mesh(&data, &["init", "--trust-domain", "other.example"]);
    assert!(!ok && err.contains("trust domain shop.example"), "{err}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(data.join("mesh/ca.key")).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "the CA key is its owner's alone");

    let (ok, out, err) = mesh(&data, &["issue", "curl", "--hours", "2"]);
    assert!(ok, "{err}");
    assert!(out.contains("spiffe://shop.example/tool/curl"), "{out}");
    let tools = data.join("mesh/tools");
    let tls = Tls::load(MeshFiles::in_dir(&tools, "curl")).expect("a usable certificate, key and bundle");
    assert_eq!(tls.identity().uri(), "spiffe://shop.example/tool/curl");

    for bad in [
        vec!["issue", "Not A Name"],
        vec!["issue", "curl", "--hours", "0"],
        vec!["issue", "curl", "--hours", "10000"],
    ] {
        let (ok, _, err) = mesh(&data, &bad);
        assert!(!ok, "{bad:?} accepted");
        assert_eq!(err.lines().count(), 1, "{bad:?}: {err}");
    }

    let (_, before, _) = mesh(&data, &["show"]);
    let (ok, out, err) = mesh(&data, &["rotate"]);
    assert!(ok, "{err}");
    assert!(out.contains("rotated"), "{out}");
    let (_, after, _) = mesh(&data, &["show"]);
    let trusted = |text: &str| text.lines().filter(|l| l.starts_with("trusted:")).count();
    assert_eq!(
        (trusted(&before), trusted(&after)),
        (1, 2),
        "old and new trusted:\n{after}"
    );
    assert!(
        after.contains("issued:  curl = spiffe://shop.example/tool/curl"),
        "{after}"
    );
    // The tool's files stay usable beside the new bundle (handshakes across a rotation:
    // the kit's mesh tests).
    std::fs::copy(data.join("mesh/bundle.pem"), tools.join("bundle.pem")).unwrap();
    Tls::load(MeshFiles::in_dir(&tools, "curl")).expect("still trusted during the overlap");
}

#[test]
fn a_ca_made_by_mesh_init_alone_is_one_up_can_use() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ok, _, err) = mesh(&data, &["init"]);
    assert!(ok, "{err}");
    let (ok, out, err) = mesh(&data, &["issue", "ops"]);
    assert!(ok, "{err}");
    let identity = format!("spiffe://{}/tool/ops", bazaar::roles::TRUST_DOMAIN);
    assert!(
        out.contains(&identity),
        "issued in up's trust domain ({identity}): {out}"
    );
}
