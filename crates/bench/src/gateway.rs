//! `bazaar-bench gateway`: the bazaar gateway as it is deployed (its own process, `bazaar
//! serve gateway`) beside HAProxy and nginx doing the same work in front of the same
//! upstream, measured by one outside load generator in one run.
//!
//! The upstream is nginx with one worker answering a fixed ~100-byte body (without nginx, a
//! small server in this process). Load comes from wrk (one thread, `--connections`
//! keep-alive connections, no pipelining) when it is on PATH, else from this process's own
//! closed-loop generator, which speaks raw HTTP/1.1 to cost as little CPU as it can. Every
//! server runs only while it is measured; all of them share this machine's cores with the
//! load generator and the upstream, so read the ratios, not the absolute figures.
//!
//! With plugins, both sides do the same work per request: verify an HS256 JWT and its `exp`
//! (HAProxy's `jwt_verify` has no EdDSA, which bazaar's own tokens use), count the client in
//! a per-second rate limit (a stick table for HAProxy), and set a fresh UUID correlation id
//! both ways (`unique-id-format %[uuid(4)]`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use base64::Engine as _;
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Response};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    process::{Child, Command},
    sync::watch,
};

use super::{Report, Sample};

/// Flags of `bazaar-bench gateway`.
#[derive(Debug, Args)]
pub struct GatewayBenchArgs {
    /// Measured seconds per variant (after a warm-up of a tenth of this, 1 to 2 s).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// The `bazaar` executable to start. Default: the one beside this executable.
    #[arg(long, env = "BAZAAR_BIN")]
    bazaar: Option<PathBuf>,
    /// Use this process's own load generator even when wrk is installed.
    #[arg(long)]
    builtin_load: bool,
    /// Rounds over every variant, interleaved; each row is its variant's median round, so
    /// a stretch of noise on a shared machine moves one round rather than one variant.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// The upstream's answer: 100 bytes, like a small JSON document.
const BODY: &str =
    r#"{"ok":true,"service":"bench-upstream","padding":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;

/// Longest a variant may run, whatever `--seconds` says, so the bench always stops.
const MAX_SECONDS: u64 = 300;
/// Most rounds over the variants.
const MAX_ROUNDS: usize = 9;

/// The shared secret of the plugin variants' HS256 tokens (both sides verify it).
const JWT_SECRET: &str = "bench-secret-0123456789abcdef0123456789abcdef";

/// The `iss` of the plugin variants' tokens: the key of the bazaar gateway's credential.
const JWT_KEY: &str = "bench-issuer";

/// `bazaar-bench gateway`.
///
/// One piece: one timeline; every variant's server starts first and idles, then each round
/// measures all variants in the same order. Start-up fallbacks (nginx or hyper upstream,
/// missing proxies) feed the same report the rows and ratios end up in.
pub async fn run(args: GatewayBenchArgs, cores: usize) -> anyhow::Result<Report> {
    if args.seconds == 0 || args.seconds > MAX_SECONDS || args.connections == 0 || args.connections > 4096 {
        bail!("--seconds must be 1..={MAX_SECONDS} and --connections 1..=4096");
    }
    if !(1..=MAX_ROUNDS).contains(&args.rounds) {
        bail!("--rounds must be 1..={MAX_ROUNDS}");
    }
    let bin = bazaar_bench::harness::bazaar_bin(args.bazaar.as_deref())?;
    let measure = Duration::from_secs(args.seconds);
    let warmup = (measure / 10).clamp(Duration::from_secs(1), Duration::from_secs(2));
    let load = Loader::pick(args.builtin_load, args.connections, warmup, measure).await;
    let dir = tempfile::tempdir().context("cannot create a temp dir")?;
    let (stop, stopped) = watch::channel(false);
    let mut report = Report::new(
        format!(
            "bench gateway: GET /bench, {} keep-alive connections from {}, {}s per variant (+{}s warm-up) in each of {} rounds, {}-byte upstream body",
            args.connections,
            load.name(),
            args.seconds,
            warmup.as_secs(),
            args.rounds,
            BODY.len()
        ),
        "req/s",
    );
    let mut upstream_server = None;
    let upstream = match Server::nginx(dir.path(), "upstream", &nginx_upstream_conf).await {
        Ok(server) => {
            let addr = server.addr;
            upstream_server = Some(server);
            addr
        }
        Err(why) => {
            report.note(format!(
                "upstream: nginx not usable ({why:#}); a hyper server in this process answers instead"
            ));
            start_upstream(stopped.clone()).await?
        }
    };

    // Every server starts first and idles while the others are measured; then each round
    // measures every variant once, in the same order.
    let mut variants = vec![Variant::new(
        "direct",
        upstream,
        None,
        &[],
        "load generator -> upstream".into(),
    )];
    let bare = Server::gateway(&bin, dir.path(), "bare", &bare_config(upstream)).await?;
    variants.push(Variant::new(
        "gateway",
        bare.addr,
        Some(bare),
        &[],
        "bazaar gateway, no plugins".into(),
    ));
    let mesh_upstream = start_mesh_upstream(dir.path(), stopped.clone()).await?;
    let mesh = Server::gateway(&bin, dir.path(), "mesh", &mesh_upstream.config).await?;
    variants.push(Variant::new(
        "gateway+mesh",
        mesh.addr,
        Some(mesh),
        &[],
        "no plugins, upstream (in this process) over mutual TLS 1.3, pooled connections".into(),
    ));
    let token = hs256_token(Duration::from_secs(3600))?;
    let auth = [("Authorization".to_string(), format!("Bearer {token}"))];
    let plugins = Server::gateway(&bin, dir.path(), "plugins", &plugins_config(upstream))
        .await
        .context("the gateway with plugins did not start")?;
    variants.push(Variant::new(
        "gateway+plugins",
        plugins.addr,
        Some(plugins),
        &auth,
        "jwt (HS256, exp) + rate-limiting (local, per second) + correlation-id (uuid)".into(),
    ));
    let mut missing = Vec::new();
    for (name, cfg, headers, note) in [
        ("haproxy", haproxy_config(upstream, false), &[][..], "no rules"),
        (
            "haproxy+plugins",
            haproxy_config(upstream, true),
            &auth[..],
            "jwt_verify HS256 + exp, stick-table rate limit, unique-id uuid both ways",
        ),
    ] {
        match Server::haproxy(dir.path(), name, &cfg).await {
            Ok(server) => {
                let note = format!("{}, {note}", server.version);
                variants.push(Variant::new(name, server.addr, Some(server), headers, note));
            }
            Err(why) => missing.push((name, why)),
        }
    }
    match Server::nginx(dir.path(), "proxy", &|addr| nginx_proxy_conf(addr, upstream)).await {
        Ok(server) => {
            let note = format!("{} as a reverse proxy, upstream keepalive 64", server.version);
            variants.push(Variant::new("nginx", server.addr, Some(server), &[], note));
        }
        Err(why) => missing.push(("nginx", why)),
    }

    let mut failed = None;
    'rounds: for round in 1..=args.rounds {
        for variant in &mut variants {
            eprintln!(
                "bench gateway: round {round}/{}: {} at {}",
                args.rounds, variant.name, variant.addr
            );
            if let Err(e) = variant.measure(&load).await {
                failed = Some(e.context(format!("variant {}", variant.name)));
                break 'rounds;
            }
        }
    }
    for variant in variants {
        let (name, note, sample) = variant.finish().await;
        if failed.is_none() {
            report.row(name, sample, note);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    for (name, why) in missing {
        report.row(name, None, "not measured (see the note below)");
        report.note(format!("{name} not measured: {why:#}"));
    }
    if let Some(server) = upstream_server {
        server.stop().await;
    }
    let _ = stop.send(true);

    report.compare("gateway", "direct");
    report.compare("gateway", "haproxy");
    report.compare("gateway", "nginx");
    report.compare("gateway+plugins", "gateway");
    report.compare("gateway+plugins", "haproxy+plugins");
    report.compare("gateway+mesh", "gateway");
    report.note(format!(
        "{cores} core(s) shared by the load generator, the upstream and the proxy under test, each its own \
         process; every proxy at its defaults for this machine (bazaar: one worker per core; HAProxy: \
         nbthread = cores; nginx: worker_processes auto) and logging as deployed (bazaar: an access line per \
         request at info; HAProxy and nginx: none). Compare ratios, not absolute figures."
    ));
    Ok(report)
}

/// A server process the bench started; killed by [`Server::stop`] (and on drop).
struct Server {
    addr: SocketAddr,
    version: String,
    child: Child,
    log: PathBuf,
}

/// One thing measured: the load generator's target, the server behind it (none for the
/// upstream itself), and a sample per round.
struct Variant {
    name: &'static str,
    addr: SocketAddr,
    server: Option<Server>,
    headers: Vec<(String, String)>,
    note: String,
    samples: Vec<Sample>,
}

impl Variant {
    fn new(
        name: &'static str,
        addr: SocketAddr,
        server: Option<Server>,
        headers: &[(String, String)],
        note: String,
    ) -> Variant {
        Variant {
            name,
            addr,
            server,
            headers: headers.to_vec(),
            note,
            samples: Vec::new(),
        }
    }

    /// Drives one round of load at the variant.
    async fn measure(&mut self, load: &Loader) -> anyhow::Result<()> {
        let sample = match &self.server {
            Some(server) => server.measure(load, &self.headers).await?,
            None => load.drive(self.addr, &self.headers).await?,
        };
        self.samples.push(sample);
        Ok(())
    }

    /// Stops the server; returns the name, the note and the median round by rate.
    async fn finish(mut self) -> (&'static str, String, Option<Sample>) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        let rounds = self.samples.into_iter().map(|s| (s, self.note.clone())).collect();
        match super::report::median(rounds) {
            Some((sample, note)) => (self.name, note, Some(sample)),
            None => (self.name, self.note, None),
        }
    }
}

impl Server {
    /// `bazaar serve gateway` with `config`, on free ports, logging as deployed.
    async fn gateway(bin: &Path, dir: &Path, name: &str, config: &str) -> anyhow::Result<Server> {
        let path = dir.join(format!("gateway-{name}.yml"));
        std::fs::write(&path, config).with_context(|| format!("cannot write {}", path.display()))?;
        if let Err(problems) = bazaar_gateway::check_config_file(&path) {
            bail!("bench gateway config is invalid: {}", problems.lines().join("; "));
        }
        let base = bazaar_bench::harness::free_base_port()?;
        let data = dir.join(format!("data-{name}"));
        let mut cmd = Command::new(bin);
        cmd.args(["serve", "gateway"])
            .env("BAZAAR_DATA", &data)
            .env("BAZAAR_BASE_PORT", base.to_string())
            .env("BAZAAR_GATEWAY_CONFIG", &path);
        for var in bazaar_bench::harness::foreign_env() {
            if var != "BAZAAR_GATEWAY_CONFIG" {
                cmd.env_remove(var);
            }
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], base));
        let version = format!("bazaar {}", env!("CARGO_PKG_VERSION"));
        Server::start(cmd, dir, &format!("gateway-{name}"), addr, version).await
    }

    /// HAProxy from PATH with `config` (whose `{addr}` is filled in).
    async fn haproxy(dir: &Path, name: &str, config: &str) -> anyhow::Result<Server> {
        let version = first_line("haproxy", "-v").await?;
        let version = version.split(" - ").next().unwrap_or("haproxy").to_string();
        let addr = free_port()?;
        let path = dir.join(format!("{name}.cfg"));
        std::fs::write(&path, config.replace("{addr}", &addr.to_string()))?;
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&path);
        Server::start(cmd, dir, name, addr, version).await
    }

    /// nginx from PATH with the config `conf` writes for a listening address.
    async fn nginx(dir: &Path, name: &str, conf: &dyn Fn(SocketAddr) -> String) -> anyhow::Result<Server> {
        let version = first_line("nginx", "-v").await?;
        let version = version.trim_start_matches("nginx version: ").to_string();
        let addr = free_port()?;
        let prefix = dir.join(format!("nginx-{name}"));
        std::fs::create_dir_all(&prefix)?;
        let path = prefix.join("nginx.conf");
        std::fs::write(&path, conf(addr))?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(prefix.join("error.log"));
        Server::start(cmd, dir, &format!("nginx-{name}"), addr, version).await
    }

    async fn start(
        mut cmd: Command,
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        version: String,
    ) -> anyhow::Result<Server> {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let server = Server {
            addr,
            version,
            child,
            log,
        };
        // Plugin variants answer 401 without a token: any status means it is listening.
        if let Err(e) = wait_listening(addr).await {
            let log = std::fs::read_to_string(&server.log).unwrap_or_default();
            server.stop().await;
            bail!("{name} did not start: {e:#}; its log: {}", log.trim());
        }
        Ok(server)
    }

    /// Waits until `GET /bench` with `headers` answers 200.
    async fn wait_answering(&self, headers: &[(String, String)]) -> anyhow::Result<()> {
        wait_answering(self.addr, "/bench", &raw_headers(headers)).await
    }

    /// Measures this server under `load`; its log's end explains a failure.
    async fn measure(&self, load: &Loader, headers: &[(String, String)]) -> anyhow::Result<Sample> {
        let waited = self.wait_answering(headers).await;
        let sample = match waited {
            Ok(()) => load.drive(self.addr, headers).await,
            Err(e) => Err(e),
        };
        sample.with_context(|| {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: String = text
                .chars()
                .rev()
                .take(2000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!("its log ends: {tail}")
        })
    }

    /// Asks the server to stop (SIGTERM: nginx's master then stops its workers, which a
    /// SIGKILL of the master leaves running) and kills it if it has not within 5 s.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let asked = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await
                .is_ok_and(|s| s.success());
            if asked
                && tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                    .await
                    .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// The first line a program prints for `arg` (on stdout or stderr), or why it cannot run.
async fn first_line(program: &str, arg: &str) -> anyhow::Result<String> {
    let out = Command::new(program).arg(arg).output().await.with_context(|| {
        format!("{program} is not on PATH (install it, e.g. `apt-get install {program}`, to compare)")
    })?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or(program)
        .trim()
        .to_string())
}

/// Where the load comes from.
enum Loader {
    Wrk(Load),
    Builtin(Load),
}

impl Loader {
    /// wrk when it is on PATH (and not refused), else the built-in generator.
    async fn pick(builtin: bool, connections: usize, warmup: Duration, measure: Duration) -> Loader {
        let load = Load {
            connections,
            warmup,
            measure,
        };
        let wrk = !builtin
            && Command::new("wrk")
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok();
        if wrk {
            Loader::Wrk(load)
        } else {
            Loader::Builtin(load)
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Loader::Wrk(_) => "wrk -t1 (its own process)",
            Loader::Builtin(_) => "the bench's built-in generator (wrk is not on PATH)",
        }
    }

    async fn drive(&self, addr: SocketAddr, headers: &[(String, String)]) -> anyhow::Result<Sample> {
        match self {
            Loader::Builtin(load) => Ok(load.drive(addr, &raw_headers(headers)).await),
            Loader::Wrk(load) => {
                // The warm-up run opens the connections and fills caches; only the second counts.
                wrk(addr, headers, load.connections, load.warmup).await?;
                let text = wrk(addr, headers, load.connections, load.measure).await?;
                parse_wrk(&text).with_context(|| format!("cannot read wrk's report:\n{text}"))
            }
        }
    }
}

/// Runs wrk once against `http://addr/bench`; returns its report.
async fn wrk(
    addr: SocketAddr,
    headers: &[(String, String)],
    connections: usize,
    time: Duration,
) -> anyhow::Result<String> {
    let mut cmd = Command::new("wrk");
    cmd.arg("-t1")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", time.as_secs().max(1)))
        .arg("--latency");
    for (name, value) in headers {
        cmd.arg("-H").arg(format!("{name}: {value}"));
    }
    cmd.arg(format!("http://{addr}/bench")).kill_on_drop(true);
    let run = tokio::time::timeout(time + Duration::from_secs(30), cmd.output())
        .await
        .context("wrk did not finish")?
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&run.stdout).into_owned();
    if !run.status.success() {
        bail!("wrk failed: {}{}", text, String::from_utf8_lossy(&run.stderr));
    }
    Ok(text)
}

/// Reads wrk's `--latency` report: requests, seconds, the 50th and 99th percentiles, and
/// non-2xx answers and socket errors as errors.
fn parse_wrk(text: &str) -> anyhow::Result<Sample> {
    let mut sample = Sample::default();
    let mut requests = None;
    let mut failed = 0usize;
    for line in text.lines().map(str::trim) {
        if let Some((count, rest)) = line.split_once(" requests in ") {
            requests = Some(count.trim().parse::<usize>()?);
            let secs = rest.split(',').next().unwrap_or("");
            sample.elapsed = parse_duration(secs.trim()).context("elapsed time")?;
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            failed += rest.trim().parse::<usize>()?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                if let Some(n) = part.split_whitespace().last() {
                    failed += n.parse::<usize>()?;
                }
            }
        } else if let Some((q, value)) = line.split_once("% ") {
            if let (Ok(q), Some(d)) = (q.parse::<f64>(), parse_duration(value.trim())) {
                sample.reported.push((q / 100.0, d.as_secs_f64() * 1000.0));
            }
        }
    }
    let requests = requests.context("no `N requests in T` line")?;
    if sample.reported.is_empty() {
        bail!("no latency distribution (was --latency given?)");
    }
    sample.count = requests.saturating_sub(failed);
    sample.errors = failed;
    Ok(sample)
}

/// `574.00us`, `1.77ms`, `5.00s`, `2.00m` as wrk prints them.
fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let secs = match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// Headers as request lines for the built-in generator.
fn raw_headers(headers: &[(String, String)]) -> String {
    headers.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect()
}

/// An HS256 JWT for the plugin variants, issued by [`JWT_KEY`] and expiring in `ttl`.
fn hs256_token(ttl: Duration) -> anyhow::Result<String> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + ttl.as_secs();
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64.encode(serde_json::to_vec(
        &serde_json::json!({"iss": JWT_KEY, "sub": "bench", "exp": exp}),
    )?);
    let signing_input = format!("{header}.{claims}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, JWT_SECRET.as_bytes());
    let signature = b64.encode(ring::hmac::sign(&key, signing_input.as_bytes()).as_ref());
    Ok(format!("{signing_input}.{signature}"))
}

/// An nginx config with `workers` worker processes, no access log and endless keep-alive
/// around `http` (the inside of its `http` block).
fn nginx_conf(workers: &str, http: &str) -> String {
    format!(
        r#"worker_processes {workers};
daemon off;
pid nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
{http}}}
"#
    )
}

/// nginx answering [`BODY`] itself: the upstream every variant reaches.
fn nginx_upstream_conf(addr: SocketAddr) -> String {
    nginx_conf(
        "1",
        &format!(
            r#"    server {{
        listen {addr};
        location / {{
            default_type application/json;
            return 200 '{BODY}';
        }}
    }}
"#
        ),
    )
}

/// nginx as a reverse proxy to `upstream`, keeping upstream connections alive.
fn nginx_proxy_conf(addr: SocketAddr, upstream: SocketAddr) -> String {
    nginx_conf(
        "auto",
        &format!(
            r#"    upstream bench {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen {addr};
        location / {{
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"#
        ),
    )
}

/// HAProxy in front of `upstream`; with `plugins`, the same work as the bazaar gateway's
/// plugin variant. `{addr}` is filled in by [`Server::haproxy`].
fn haproxy_config(upstream: SocketAddr, plugins: bool) -> String {
    let rules = if plugins {
        format!(
            r#"    unique-id-format %[uuid(4)]
    http-request set-header X-Correlation-ID %[unique-id]
    http-after-response set-header X-Correlation-ID %[unique-id]
    stick-table type ip size 100k expire 2s store http_req_rate(1s)
    http-request track-sc0 src
    http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt 100000000 }}
    http-request deny deny_status 401 unless {{ http_auth_bearer -m found }}
    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
    http-request deny deny_status 401 unless {{ var(txn.alg) -m str HS256 }}
    http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,"{JWT_SECRET}") -m int 1 }}
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
    http-request set-var(txn.now) date()
    http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}
"#
        )
    } else {
        String::new()
    };
    format!(
        "global
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend bench
    bind {{addr}}
{rules}    default_backend upstream
backend upstream
    http-reuse always
    server upstream {upstream}
"
    )
}

fn bare_config(upstream: SocketAddr) -> String {
    format!(
        r#"_format_version: "3.0"
services:
  - name: bench
    url: http://{upstream}
    routes:
      - name: bench
        paths: [/bench]
        strip_path: false
"#
    )
}

fn plugins_config(upstream: SocketAddr) -> String {
    format!(
        r#"{bare}
consumers:
  - username: bench
    jwt_secrets:
      - key: {JWT_KEY}
        algorithm: HS256
        secret: {JWT_SECRET}

plugins:
  - name: jwt
    config:
      claims_to_verify: [exp]
  - name: rate-limiting
    config:
      second: 100000000
      limit_by: ip
      policy: local
  - name: correlation-id
    config:
      header_name: X-Correlation-ID
      generator: uuid
      echo_downstream: true
"#,
        bare = bare_config(upstream),
    )
}

/// A loopback address nobody listens on right now.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Polls until something accepts connections at `addr`, for at most 10 s.
async fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens at {addr} after 10s")
}

/// Polls until `GET path` at `addr` answers 200, for at most 10 s.
async fn wait_answering(addr: SocketAddr, path: &str, headers: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = String::new();
    while Instant::now() < deadline {
        match Connection::open(addr, path, headers).await {
            Ok(mut c) => match c.round_trip().await {
                Ok(200) => return Ok(()),
                Ok(status) => last = format!("status {status}"),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{addr} did not answer 200 within 10s (last: {last})")
}

/// Serves `BODY` with 200 on every request until `stop` flips.
async fn start_upstream(mut stop: watch::Receiver<bool>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
            };
            let _ = stream.set_nodelay(true);
            let mut conn_stop = stop.clone();
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(BODY.as_bytes())))
                            .expect("static response parts are valid"),
                    )
                });
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = conn_stop.wait_for(|s| *s) => {}
                }
            });
        }
    });
    Ok(addr)
}

/// An upstream answering [`BODY`] over the mesh's mutual TLS (kit's `serve_mtls`, a
/// certificate from a fresh mesh CA), and the gateway config that reaches it as bazaar's
/// default config reaches a service.
struct MeshUpstream {
    config: String,
}

async fn start_mesh_upstream(dir: &Path, mut stop: watch::Receiver<bool>) -> anyhow::Result<MeshUpstream> {
    use bazaar_kit::mesh::{Authority, Identity, MeshFiles, Tls};
    let ca = Authority::create("bench", Duration::from_secs(3600))?;
    let issue = |role: &str| -> anyhow::Result<MeshFiles> {
        let files = MeshFiles::in_dir(dir, &format!("mesh-{role}"));
        ca.issue(&Identity::role("bench", role)?, Duration::from_secs(3600))?
            .write(&files)?;
        std::fs::write(&files.bundle, ca.cert_pem())?;
        Ok(files)
    };
    let upstream = Arc::new(Tls::load(issue("upstream")?)?);
    let gateway = issue("gateway")?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().fallback(|| async {
        (
            [(hyper::header::CONTENT_TYPE, "application/json")],
            Bytes::from_static(BODY.as_bytes()),
        )
    });
    tokio::spawn(async move {
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let _ = bazaar_kit::mesh::serve_mtls(listener, app, upstream, stopped).await;
    });
    let pem = |path: &Path| -> anyhow::Result<String> { Ok(serde_json::to_string(&std::fs::read_to_string(path)?)?) };
    let config = format!(
        r#"_format_version: "3.0"
certificates:
  - id: mesh
    cert: {cert}
    key: {key}
ca_certificates:
  - id: mesh-ca
    cert: {ca}
upstreams:
  - name: upstream.bench
    targets: [{{target: "{addr}"}}]
services:
  - name: bench
    url: https://upstream.bench
    client_certificate: mesh
    tls_verify: true
    ca_certificates: [mesh-ca]
    routes:
      - name: bench
        paths: [/bench]
        strip_path: false
"#,
        cert = pem(&gateway.cert)?,
        key = pem(&gateway.key)?,
        ca = pem(&gateway.bundle)?,
    );
    Ok(MeshUpstream { config })
}

/// The closed-loop load generator's settings.
struct Load {
    connections: usize,
    warmup: Duration,
    measure: Duration,
}

impl Load {
    /// Runs every connection until the end of the measured window; counts what started
    /// inside the window.
    async fn drive(&self, addr: SocketAddr, headers: &str) -> Sample {
        let start = Instant::now() + self.warmup;
        let end = start + self.measure;
        let tasks: Vec<_> = (0..self.connections)
            .map(|_| {
                let headers = headers.to_string();
                tokio::spawn(async move { connection_loop(addr, &headers, start, end).await })
            })
            .collect();
        let mut total = Sample {
            elapsed: self.measure,
            ..Sample::default()
        };
        for t in tasks {
            if let Ok(s) = t.await {
                total.count += s.count;
                total.errors += s.errors;
                total.latencies.extend(s.latencies);
            }
        }
        total.finish()
    }
}

/// One connection sending requests back to back until `end`, reconnecting after an error.
async fn connection_loop(addr: SocketAddr, headers: &str, start: Instant, end: Instant) -> Sample {
    let mut sample = Sample::default();
    let mut conn: Option<Connection> = None;
    while Instant::now() < end {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Connection::open(addr, "/bench", headers).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    sample.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let t0 = Instant::now();
        let result = c.round_trip().await;
        let counted = t0 >= start && t0 < end;
        match result {
            Ok(200) if counted => {
                sample.count += 1;
                sample.latencies.push(t0.elapsed());
            }
            Ok(200) => {}
            Ok(_) if counted => sample.errors += 1,
            Ok(_) => {}
            Err(_) => {
                if counted {
                    sample.errors += 1;
                }
                conn = None;
            }
        }
        if conn.as_ref().is_some_and(|c| c.closed) {
            conn = None;
        }
    }
    sample
}

/// A keep-alive HTTP/1.1 client connection that sends one fixed request at a time.
struct Connection {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
    /// The server said `Connection: close`.
    closed: bool,
}

impl Connection {
    async fn open(addr: SocketAddr, path: &str, headers: &str) -> std::io::Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: bazaar-bench\r\n{headers}\r\n").into_bytes();
        Ok(Connection {
            stream,
            request,
            buf: Vec::with_capacity(4096),
            closed: false,
        })
    }

    /// Sends the request and reads the whole response; returns its status.
    async fn round_trip(&mut self) -> std::io::Result<u16> {
        self.stream.write_all(&self.request).await?;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).map_err(|_| invalid("response head is not UTF-8"))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid("no status"))?;
        let mut length = None;
        let mut chunked = false;
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
                self.closed = true;
            }
        }
        let consumed = if chunked {
            self.read_chunked(head_end).await?
        } else {
            let end = head_end + length.unwrap_or(0);
            while self.buf.len() < end {
                self.fill().await?;
            }
            end
        };
        self.buf.drain(..consumed);
        Ok(status)
    }

    /// Reads a chunked body starting at `at`; returns where the response ends.
    async fn read_chunked(&mut self, mut at: usize) -> std::io::Result<usize> {
        loop {
            let line_end = loop {
                if let Some(i) = find(&self.buf[at..], b"\r\n") {
                    break at + i;
                }
                self.fill().await?;
            };
            let size_text = std::str::from_utf8(&self.buf[at..line_end]).map_err(|_| invalid("chunk size"))?;
            let size_text = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("chunk size"))?;
            at = line_end + 2;
            if size == 0 {
                // No trailers are expected: the body ends with an empty line.
                while self.buf.len() < at + 2 {
                    self.fill().await?;
                }
                return Ok(at + 2);
            }
            while self.buf.len() < at + size + 2 {
                self.fill().await?;
            }
            at += size + 2;
        }
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        self.buf.reserve(4096);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_load_generator_keeps_one_connection_for_many_requests() {
        let (stop, stopped) = watch::channel(false);
        let upstream = start_upstream(stopped).await.unwrap();
        let mut conn = Connection::open(upstream, "/bench", "").await.unwrap();
        for _ in 0..3 {
            assert_eq!(conn.round_trip().await.unwrap(), 200);
        }
        assert!(conn.buf.is_empty(), "the whole response was consumed");
        let _ = stop.send(true);
    }

    #[test]
    fn wrk_reports_are_read_with_their_percentiles_and_errors() {
        let text = "Running 5s test @ http://127.0.0.1:18900/bench
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   680.11us  301.42us  12.18ms   91.12%
    Req/Sec    47.99k     2.10k   51.63k    74.00%
  Latency Distribution
     50%  604.00us
     75%  705.00us
     90%    0.88ms
     99%    1.77ms
  238812 requests in 5.00s, 55.25MB read
  Non-2xx or 3xx responses: 12
  Socket errors: connect 0, read 1, write 0, timeout 2
Requests/sec:  47759.69
Transfer/sec:     11.05MB
";
        let sample = parse_wrk(text).unwrap();
        assert_eq!(sample.count, 238812 - 15);
        assert_eq!(sample.errors, 15);
        assert_eq!(sample.elapsed, Duration::from_secs(5));
        assert!((sample.ms(0.5) - 0.604).abs() < 1e-9);
        assert!((sample.ms(0.99) - 1.77).abs() < 1e-9);
        assert!(
            parse_wrk("Requests/sec: 1\n").is_err(),
            "a report without counts is refused"
        );
    }

    #[test]
    fn nginx_configs_are_accepted_by_nginx_when_it_is_installed() {
        let Ok(out) = std::process::Command::new("nginx").arg("-v").output() else {
            return; // nginx is optional for the bench; nothing to check against
        };
        assert!(out.status.success());
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        for conf in [nginx_upstream_conf(addr), nginx_proxy_conf(addr, addr)] {
            let path = dir.path().join("nginx.conf");
            std::fs::write(&path, conf).unwrap();
            let checked = std::process::Command::new("nginx")
                .arg("-t")
                .arg("-p")
                .arg(dir.path())
                .arg("-c")
                .arg(&path)
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .output()
                .unwrap();
            assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
        }
    }

    #[test]
    fn the_bench_token_is_a_valid_hs256_jwt_for_the_gateway_config() {
        let token = hs256_token(Duration::from_secs(60)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, JWT_SECRET.as_bytes());
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[2])
            .unwrap();
        ring::hmac::verify(&key, format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plugins.yml");
        std::fs::write(&path, plugins_config("127.0.0.1:9".parse().unwrap())).unwrap();
        bazaar_gateway::check_config_file(&path).unwrap();
    }

    #[tokio::test]
    async fn chunked_responses_are_read_to_their_end() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            for _ in 0..2 {
                let _ = s.read(&mut buf).await.unwrap();
                s.write_all(b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
                    .await
                    .unwrap();
            }
        });
        let mut conn = Connection::open(addr, "/", "").await.unwrap();
        assert_eq!(conn.round_trip().await.unwrap(), 429);
        assert_eq!(conn.round_trip().await.unwrap(), 429);
        assert!(conn.buf.is_empty());
    }
}
