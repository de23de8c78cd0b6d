//! `bazaar mesh`: the installation's mesh CA under DATA/mesh. `init` creates it, `show` tells
//! what it is and what it issued, `issue` makes a certificate for an operator's tool (to call
//! roles over mutual TLS, with curl say), and `rotate` replaces the CA while peers trust old
//! and new side by side.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use bazaar_kit::mesh::{fingerprint, Authority, Identity, MeshFiles, Workload};
use clap::Subcommand;

/// How long a mesh CA lives.
const CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// The longest a certificate `mesh issue` makes may live.
const MAX_TOOL_HOURS: u64 = 24 * 30;

/// What `bazaar mesh` does.
#[derive(Debug, Subcommand)]
pub enum MeshCommand {
    /// Creates the mesh CA under DATA/mesh unless there is one.
    Init {
        /// The trust domain of the identities it issues (`bazaar up` and its roles use the
        /// default; another is for certificates of your own).
        #[arg(long, default_value = bazaar::roles::TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Shows the CA, the CAs peers trust, and the certificates issued under DATA/mesh.
    Show,
    /// Issues a certificate for an operator's tool: spiffe://<trust-domain>/tool/NAME.
    Issue {
        /// The tool's name (lower-case letters, digits, `-`).
        name: String,
        /// Where to write NAME.crt, NAME.key and bundle.pem. Default: DATA/mesh/tools.
        #[arg(long)]
        out: Option<PathBuf>,
        /// How long it is valid, in hours (at most 720).
        #[arg(long, default_value_t = 8)]
        hours: u64,
    },
    /// Makes a new CA the issuer; peers trust the new and the previous one until the next
    /// rotation, so certificates the old one issued keep working until they are renewed.
    Rotate,
}

/// The mesh directory of an installation.
pub fn dir(data: &Path) -> PathBuf {
    data.join("mesh")
}

/// Runs `bazaar mesh COMMAND`.
pub fn run(data: &Path, command: MeshCommand) -> anyhow::Result<()> {
    let dir = dir(data);
    match command {
        MeshCommand::Init { trust_domain } => {
            let (ca, created) = ensure_ca(&dir, &trust_domain)?;
            let verb = if created { "created" } else { "already there" };
            println!(
                "mesh CA {verb}: {} (trust domain {}, sha256 {})",
                ca.common_name(),
                ca.trust_domain(),
                ca.fingerprint()
            );
            Ok(())
        }
        MeshCommand::Show => show(&dir),
        MeshCommand::Issue { name, out, hours } => {
            if hours == 0 || hours > MAX_TOOL_HOURS {
                bail!("--hours must be 1 to {MAX_TOOL_HOURS}, not {hours}");
            }
            let ca = load(&dir)?;
            let identity = Identity::new(ca.trust_domain(), Workload::Tool, &name)?;
            let out = out.unwrap_or_else(|| dir.join("tools"));
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let files = MeshFiles::in_dir(&out, &name);
            ca.issue(&identity, Duration::from_secs(hours * 3600))?.write(&files)?;
            let bundle = std::fs::read_to_string(dir.join("bundle.pem")).context("cannot read the trust bundle")?;
            bazaar_trust::files::write_private(&files.bundle, &bundle)
                .with_context(|| format!("cannot write {}", files.bundle.display()))?;
            println!(
                "issued {identity} for {hours} h: {} {} (trust {})",
                files.cert.display(),
                files.key.display(),
                files.bundle.display()
            );
            Ok(())
        }
        MeshCommand::Rotate => {
            let old = load(&dir)?;
            let next = Authority::create(old.trust_domain(), CA_LIFETIME)?;
            next.save(&dir)?;
            let bundle = [next.cert_pem(), old.cert_pem()].concat();
            bazaar_trust::files::write_private(&dir.join("bundle.pem"), &bundle)
                .context("cannot write the trust bundle")?;
            println!(
                "mesh CA rotated: {} now issues; {} stays trusted until the next rotation",
                next.fingerprint(),
                old.fingerprint()
            );
            Ok(())
        }
    }
}

/// The CA in `dir`, created (for `trust_domain`) when there is none; and whether it was.
pub fn ensure_ca(dir: &std::path::Path, trust_domain: &str) -> anyhow::Result<(Authority, bool)> {
    if dir.join("ca.key").exists() {
        let ca = load(dir)?;
        if ca.trust_domain() != trust_domain {
            bail!(
                "the mesh CA in {} is for trust domain {}, not {trust_domain}; rotate or remove it",
                dir.display(),
                ca.trust_domain()
            );
        }
        return Ok((ca, false));
    }
    let ca = Authority::create(trust_domain, CA_LIFETIME)?;
    ca.save(dir)?;
    bazaar_trust::files::write_private(&dir.join("bundle.pem"), ca.cert_pem())
        .context("cannot write the trust bundle")?;
    Ok((ca, true))
}

fn load(dir: &std::path::Path) -> anyhow::Result<Authority> {
    if !dir.join("ca.key").exists() {
        bail!("no mesh CA in {} (run `bazaar mesh init`)", dir.display());
    }
    Authority::load(dir).with_context(|| format!("cannot load the mesh CA in {}", dir.display()))
}

fn when(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map_or_else(|| secs.to_string(), |t| t.to_rfc3339())
}

fn show(dir: &std::path::Path) -> anyhow::Result<()> {
    let ca = load(dir)?;
    println!("issuer:  {}", ca.common_name());
    println!("domain:  {}", ca.trust_domain());
    println!("sha256:  {}", ca.fingerprint());
    println!("expires: {}", when(ca.not_after()));
    let bundle = std::fs::read_to_string(dir.join("bundle.pem")).context("cannot read the trust bundle")?;
    for pem in bundle.split_inclusive("-----END CERTIFICATE-----\n") {
        if pem.contains("BEGIN CERTIFICATE") {
            println!("trusted: {}", fingerprint(pem));
        }
    }
    let mut issued: Vec<PathBuf> = [dir.to_path_buf(), dir.join("tools")]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "crt") && p.file_name().is_some_and(|n| n != "ca.crt"))
        .collect();
    issued.sort();
    for path in issued {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let files = MeshFiles {
            cert: path.clone(),
            key: path.with_extension("key"),
            bundle: dir.join("bundle.pem"),
        };
        match bazaar_kit::mesh::Tls::load(files) {
            Ok(tls) => println!("issued:  {name} = {}", tls.identity()),
            Err(e) => println!("issued:  {name}: {e}"),
        }
    }
    Ok(())
}

/// How long a role instance's certificate lives.
const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How long `up` waits before it renews the certificates (a third of their life).
const RENEW_AFTER: Duration = Duration::from_secs(8 * 3600);

/// After a CA rotation, how long every peer gets to load the new trust bundle (services
/// look every 5 s, the gateway every 2 s) before certificates from the new CA appear.
const TRUST_PROPAGATION: Duration = Duration::from_secs(12);

/// What a renewal check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Nothing was due.
    Nothing,
    /// The CA was rotated: peers now load the bundle that trusts it; certificates follow.
    Trusted,
    /// Every certificate was issued again.
    Renewed,
}

/// The mesh `up` runs: the CA under DATA/mesh and a certificate per role instance, renewed a
/// third of the way through their life and as soon as the CA is rotated.
pub struct UpMesh {
    dir: PathBuf,
    /// (file name, role) of every certificate it keeps.
    holders: Vec<(String, &'static str)>,
    /// The CA that issued the current certificates.
    issuer: String,
    issued_at: std::time::Instant,
    /// When a rotated CA was first seen, while peers take up the new trust bundle.
    rotation_seen: Option<std::time::Instant>,
}

impl UpMesh {
    /// Creates the CA when there is none and issues a certificate for each of `holders`
    /// (file name, role).
    pub fn start(data: &Path, holders: Vec<(String, &'static str)>) -> anyhow::Result<UpMesh> {
        let dir = dir(data);
        let (ca, created) = ensure_ca(&dir, bazaar::roles::TRUST_DOMAIN)?;
        if created {
            tracing::info!(sha256 = %ca.fingerprint(), "mesh: created the CA");
        }
        let mut mesh = UpMesh {
            dir,
            holders,
            issuer: String::new(),
            issued_at: std::time::Instant::now(),
            rotation_seen: None,
        };
        mesh.issue_all(&ca)?;
        Ok(mesh)
    }

    fn issue_all(&mut self, ca: &Authority) -> anyhow::Result<()> {
        for (file, role) in &self.holders {
            let identity = Identity::role(ca.trust_domain(), role)?;
            ca.issue(&identity, LEAF_LIFETIME)?
                .write(&MeshFiles::in_dir(&self.dir, file))?;
        }
        self.issuer = ca.fingerprint();
        self.issued_at = std::time::Instant::now();
        Ok(())
    }

    /// Renews every certificate when they are a third through their life; after a CA
    /// rotation, first lets every peer trust the new CA ([`TRUST_PROPAGATION`]), then issues
    /// from it, so no peer meets a certificate it does not trust yet. The roles pick the new
    /// files up by themselves; the caller rewrites the gateway's config.
    pub fn renew_if_due(&mut self) -> anyhow::Result<Renewal> {
        // Every check reads the CA's certificate only; its key is loaded when issuing.
        let cert = self.dir.join("ca.crt");
        let current =
            fingerprint(&std::fs::read_to_string(&cert).with_context(|| format!("cannot read {}", cert.display()))?);
        if current != self.issuer {
            match self.rotation_seen {
                None => {
                    self.rotation_seen = Some(std::time::Instant::now());
                    return Ok(Renewal::Trusted);
                }
                Some(at) if at.elapsed() < TRUST_PROPAGATION => return Ok(Renewal::Nothing),
                Some(_) => self.rotation_seen = None,
            }
        } else if self.issued_at.elapsed() < RENEW_AFTER {
            return Ok(Renewal::Nothing);
        }
        self.issue_all(&load(&self.dir)?)?;
        Ok(Renewal::Renewed)
    }

    /// The files of holder `file`.
    pub fn files(&self, file: &str) -> MeshFiles {
        MeshFiles::in_dir(&self.dir, file)
    }

    /// The certificate, key and trust bundle (PEMs) of holder `file`.
    pub fn pems(&self, file: &str) -> anyhow::Result<(String, String, String)> {
        let files = self.files(file);
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
        };
        Ok((read(&files.cert)?, read(&files.key)?, read(&files.bundle)?))
    }
}

/// The first line of a policy `up` wrote; it rewrites a file that still starts with it.
pub const POLICY_MARKER: &str =
    "# Generated by `bazaar up` from the role table's edges, and rewritten at each start while this line is here; delete this line to keep your own edits.";

/// The mesh policy under DATA/mesh, written from the role table's edges unless the operator
/// owns it (deleted the marker line): the gateway and operators' tools may call every route
/// of every service, every other service may read users' public token keys, web may call
/// users' credential routes, and payments may call the payment simulator. Anything else is refused.
pub fn ensure_policy(data: &Path) -> anyhow::Result<PathBuf> {
    let path = dir(data).join("policy.yaml");
    let ours = std::fs::read_to_string(&path).map_or(true, |text| text.starts_with(POLICY_MARKER));
    if !ours {
        return Ok(path);
    }
    let domain = bazaar::roles::TRUST_DOMAIN;
    let users = bazaar_users::SERVICE.name;
    let mut text = format!(
        "{POLICY_MARKER}\n# Who may call which routes of which role over the mesh (`METHOD /path`, `*` for any;\n# a path ending in `*` covers what is below it). Anything not listed is refused with 403.\nroles:\n"
    );
    let others: Vec<String> = bazaar::roles::services()
        .filter(|(_, spec)| spec.name != users)
        .map(|(_, spec)| format!("\"spiffe://{domain}/role/{}\"", spec.name))
        .collect();
    for (_, spec) in bazaar::roles::services() {
        text.push_str(&format!(
            "  {}:\n    - from: [\"spiffe://{domain}/role/gateway\", \"spiffe://{domain}/tool/*\"]\n      routes: [\"*\"]\n",
            spec.name
        ));
        if spec.name == users {
            text.push_str(&format!(
                "    - from: [{}]\n      routes: [\"GET {}\"]\n",
                others.join(", "),
                bazaar_kit::auth::JWKS_PATH
            ));
            // The storefront's credential forms (limited per shopper at the gateway).
            text.push_str(&format!(
                "    - from: [\"spiffe://{domain}/role/{}\"]\n      routes: [{}]\n",
                bazaar_web::SERVICE.name,
                bazaar_web::CREDENTIAL_ROUTES.map(|r| format!("\"{r}\"")).join(", ")
            ));
        }
    }
    // The payment simulator stands in for an outside provider that payments calls.
    text.push_str(&format!(
        "  {}:\n    - from: [\"spiffe://{domain}/role/{}\", \"spiffe://{domain}/tool/*\"]\n      routes: [\"*\"]\n",
        bazaar::roles::PAYMENT_SIM,
        bazaar_payments::SERVICE.name
    ));
    bazaar_trust::files::write_private(&path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}
