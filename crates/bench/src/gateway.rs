//! `bazaar-bench gateway`: the cost of the bazaar gateway as a reverse proxy, next to no
//! proxy at all and to HAProxy, measured by one closed-loop load generator in one run.
//!
//! A tiny in-process upstream answers every request with a fixed ~100-byte body. The load
//! generator opens `--connections` keep-alive HTTP/1.1 connections and sends requests back
//! to back on each (no pipelining) for `--seconds`, after a short warm-up that is not counted.
//! It speaks raw HTTP/1.1 over `TcpStream` so that it costs as little CPU as possible; on a
//! small machine it still competes with the servers for the same cores.

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Response};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{Report, Sample};

/// Flags of `bazaar-bench gateway`.
#[derive(Debug, Args)]
pub struct GatewayBenchArgs {
    /// Measured seconds per variant (after a warm-up of a tenth of this, at most 2 s).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent keep-alive connections of the load generator.
    #[arg(long, default_value_t = 32)]
    connections: usize,
}

/// The upstream's answer: 100 bytes, like a small JSON document.
const BODY: &[u8] =
    b"{\"ok\":true,\"service\":\"bench-upstream\",\"padding\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}";

/// Longest a variant may run, whatever `--seconds` says, so the bench always stops.
const MAX_SECONDS: u64 = 300;

/// `bazaar-bench gateway`.
pub async fn run(args: GatewayBenchArgs, cores: usize) -> anyhow::Result<Report> {
    if args.seconds == 0 || args.seconds > MAX_SECONDS || args.connections == 0 || args.connections > 4096 {
        bail!("--seconds must be 1..={MAX_SECONDS} and --connections 1..=4096");
    }
    let measure = Duration::from_secs(args.seconds);
    let warmup = (measure / 10).min(Duration::from_secs(2));
    let mut report = Report::new(
        format!(
            "bench gateway: GET /bench, {} keep-alive connections, {}s per variant (+{:.1}s warm-up), {}-byte upstream body",
            args.connections,
            args.seconds,
            warmup.as_secs_f64(),
            BODY.len()
        ),
        "req/s",
    );
    // The gateway records into the same Prometheus recorder as `bazaar serve gateway` does.
    bazaar_kit::telemetry::metrics();
    let (stop, stopped) = watch::channel(false);
    let upstream = start_upstream(stopped.clone()).await?;
    let dir = tempfile::tempdir().context("cannot create a temp dir")?;
    let load = Load {
        connections: args.connections,
        warmup,
        measure,
    };

    eprintln!("bench gateway: direct to the upstream at {upstream}");
    let direct = load.drive(upstream, "").await;
    report.row("direct", Some(direct), "load generator -> upstream");

    let key = bazaar_kit::auth::SigningKey::generate().context("cannot make the bench's signing key")?;
    let bare = start_gateway(dir.path(), "bare", &bare_config(upstream), "", stopped.clone()).await?;
    eprintln!("bench gateway: through the bazaar gateway at {bare} (no plugins)");
    let sample = load.drive(bare, "").await;
    report.row("gateway", Some(sample), "bazaar gateway, no plugins");

    eprintln!("bench gateway: through the bazaar gateway to an mTLS upstream (the mesh's hop)");
    let mesh_upstream = start_mesh_upstream(dir.path(), stopped.clone()).await?;
    let mesh_gw = start_gateway(dir.path(), "mesh", &mesh_upstream.config, "", stopped.clone()).await?;
    let sample = load.drive(mesh_gw, "").await;
    report.row(
        "gateway+mesh",
        Some(sample),
        "bazaar gateway, no plugins, upstream over mutual TLS 1.3 (pooled connections)",
    );

    let token = key
        .issue(
            uuid::Uuid::now_v7(),
            "bench@example.com",
            &[],
            Duration::from_secs(3600),
        )
        .context("cannot mint the bench's JWT")?;
    let headers = format!("Authorization: Bearer {token}\r\n");
    let config = plugins_config(upstream, &key.public_key_pem())?;
    let full = start_gateway(dir.path(), "plugins", &config, &headers, stopped.clone()).await?;
    eprintln!("bench gateway: through the bazaar gateway at {full} (jwt, rate-limiting, correlation-id)");
    let sample = load.drive(full, &headers).await;
    report.row(
        "gateway+plugins",
        Some(sample),
        "jwt (EdDSA, as bazaar's tokens) + rate-limiting (local) + correlation-id",
    );

    match start_haproxy(dir.path(), upstream).await {
        Ok(mut haproxy) => {
            eprintln!("bench gateway: through HAProxy at {}", haproxy.addr);
            let sample = load.drive(haproxy.addr, "").await;
            report.row("haproxy", Some(sample), haproxy.version.clone());
            haproxy.stop().await;
        }
        Err(why) => {
            eprintln!("bench gateway: HAProxy not measured: {why:#}");
            report.row("haproxy", None, "not measured (see the note below)");
            report.note(format!("HAProxy not measured: {why:#}"));
        }
    }
    let _ = stop.send(true);

    report.compare("gateway", "direct");
    report.compare("gateway+mesh", "gateway");
    report.compare("gateway+plugins", "direct");
    report.compare("gateway", "haproxy");
    report.compare("gateway+plugins", "haproxy");
    report.note(format!(
        "{cores} core(s) shared by the load generator, the upstream and the proxy under test; \
         the bazaar gateway runs in this process (same tokio runtime as the load generator), \
         HAProxy as its own process (default nbthread). Compare ratios, not absolute figures."
    ));
    Ok(report)
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
                            .body(Full::new(Bytes::from_static(BODY)))
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
            Bytes::from_static(BODY),
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

fn plugins_config(upstream: SocketAddr, public_key_pem: &str) -> anyhow::Result<String> {
    Ok(format!(
        r#"{bare}
consumers:
  - username: bench
    jwt_secrets:
      - key: {issuer}
        algorithm: EdDSA
        rsa_public_key: {pem}

plugins:
  - name: jwt
    config:
      claims_to_verify: [exp]
  - name: rate-limiting
    config:
      second: 100000000
      minute: 1000000000
      limit_by: ip
      policy: local
  - name: correlation-id
    config:
      header_name: X-Correlation-ID
      generator: uuid
      echo_downstream: true
"#,
        bare = bare_config(upstream),
        issuer = bazaar_kit::auth::ISSUER,
        pem = serde_json::to_string(public_key_pem)?,
    ))
}

/// Starts the bazaar gateway in this process on 127.0.0.1:0 with `config` and waits until a
/// request with `headers` passes; it stops when `stop` flips.
async fn start_gateway(
    dir: &Path,
    name: &str,
    config: &str,
    headers: &str,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<SocketAddr> {
    let path = dir.join(format!("{name}.yml"));
    std::fs::write(&path, config).with_context(|| format!("cannot write {}", path.display()))?;
    if let Err(problems) = bazaar_gateway::check_config_file(&path) {
        bail!("bench gateway config is invalid: {}", problems.lines().join("; "));
    }
    let proxy = TcpListener::bind("127.0.0.1:0").await?;
    let admin = TcpListener::bind("127.0.0.1:0").await?;
    let addr = proxy.local_addr()?;
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let render = Arc::new(bazaar_kit::telemetry::render_metrics);
        if let Err(e) = bazaar_gateway::serve_with_listeners(path, proxy, admin, render, shutdown).await {
            eprintln!("bench gateway: the gateway stopped: {e}");
        }
    });
    wait_answering(addr, "/bench", headers).await?;
    Ok(addr)
}

/// A running HAProxy child, killed by [`Haproxy::stop`] (and on drop).
struct Haproxy {
    addr: SocketAddr,
    version: String,
    child: tokio::process::Child,
}

impl Haproxy {
    async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// Runs `haproxy` from PATH in front of `upstream`, or says why it cannot.
async fn start_haproxy(dir: &Path, upstream: SocketAddr) -> anyhow::Result<Haproxy> {
    let version = tokio::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .await
        .context("haproxy is not on PATH (install it, e.g. `apt-get install haproxy`, to compare)")?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("haproxy")
        .split(" - ")
        .next()
        .unwrap_or("haproxy")
        .to_string();
    let addr = free_port()?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global
    maxconn 2048
defaults
    mode http
    option http-keep-alive
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend bench
    bind {addr}
    default_backend upstream
backend upstream
    http-reuse always
    server upstream {upstream}
"
        ),
    )?;
    let log = std::fs::File::create(dir.join("haproxy.log"))?;
    let child = tokio::process::Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("cannot start haproxy")?;
    let mut haproxy = Haproxy { addr, version, child };
    if let Err(e) = wait_answering(addr, "/bench", "").await {
        haproxy.stop().await;
        let log = std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default();
        bail!("haproxy did not answer: {e:#}; its log: {}", log.trim());
    }
    Ok(haproxy)
}

/// A loopback address nobody listens on right now.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
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
