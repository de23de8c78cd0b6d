//! A host of its own for one process: a network namespace joined to this one by a veth pair,
//! with the servers it needs (PostgreSQL, the NATS nodes) forwarded to ports at the pair's
//! near address, and a link that can be cut and mended. Cut, every packet on the link is
//! dropped and nothing is reset: the process inside sees a partition; the servers see the
//! forwarder's connections go silent, as they would see a client that froze. Needs root and
//! iproute2's `ip`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Names of this module's namespaces: `bzcut-<pid of the test process>-<index>`.
const PREFIX: &str = "bzcut-";

/// A namespace, its link and its forwarders; everything is removed on drop.
pub struct Host {
    name: String,
    link: String,
    /// Each forwarded server as `host:port`, and where it answers from inside.
    forwarded: Vec<(String, SocketAddr)>,
    forwards: Vec<tokio::task::JoinHandle<()>>,
    process: Option<Child>,
}

/// Runs `ip ARGS`; the error says which command failed and what it printed.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why no namespace can be made here (not root, no `ip`), or `Ok` when one can.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid only reads this process's effective user id.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    ip(&["netns", "list"]).map(|_| ())
}

/// Removes the namespaces (and with them their links) of test processes that are gone: a
/// run killed before its hosts were dropped.
fn remove_leftovers() {
    let Ok(list) = ip(&["netns", "list"]) else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let pid = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next());
        if pid.is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Host {
    /// Host number `index` (0–63) of this test process, with each of `servers` (`host:port`)
    /// forwarded to a port of its own at the link's near address.
    pub async fn new(index: u8, servers: &[String]) -> Result<Host, String> {
        remove_leftovers();
        let pid = std::process::id();
        // A subnet per test process and host, so that runs side by side do not meet.
        let (a, b) = (100 + (pid % 100) as u8, index * 4);
        let near_ip = Ipv4Addr::new(10, a, 0, b + 1);
        let mut host = Host {
            name: format!("{PREFIX}{pid}-{index}"),
            link: format!("bzh{pid}x{index}"),
            forwarded: Vec::new(),
            forwards: Vec::new(),
            process: None,
        };
        let (near, far, peer) = (
            format!("{near_ip}/30"),
            format!("10.{a}.0.{}/30", b + 2),
            format!("bzf{pid}x{index}"),
        );
        ip(&["netns", "add", &host.name])?;
        ip(&["link", "add", &host.link, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &host.name])?;
        ip(&["addr", "add", &near, "dev", &host.link])?;
        ip(&["link", "set", &host.link, "up"])?;
        for args in [
            vec!["addr", "add", far.as_str(), "dev", peer.as_str()],
            vec!["link", "set", peer.as_str(), "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut inside = vec!["netns", "exec", host.name.as_str(), "ip"];
            inside.extend(args);
            ip(&inside)?;
        }
        for server in servers {
            let listener = tokio::net::TcpListener::bind((near_ip, 0))
                .await
                .map_err(|e| format!("forward {server}: {e}"))?;
            let at = listener.local_addr().map_err(|e| e.to_string())?;
            host.forwarded.push((server.clone(), at));
            host.forwards.push(tokio::spawn(forward(listener, server.clone())));
        }
        Ok(host)
    }

    /// `url` with every forwarded server's `host:port` replaced by where it answers inside.
    pub fn rewrite(&self, url: &str) -> String {
        self.forwarded.iter().fold(url.to_string(), |url, (server, at)| {
            url.replace(server.as_str(), &at.to_string())
        })
    }

    /// Starts `program ARGS` inside, with exactly `env`, its output written to `log`. It is
    /// killed if this process dies first.
    pub fn spawn(&mut self, program: &str, args: &[&str], env: &[(String, String)], log: &Path) {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: between fork and exec the closure only calls prctl, which is
        // async-signal-safe; `ip netns exec` execs the program, which keeps the setting.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.process = Some(command.spawn().expect("start the process inside"));
    }

    /// Drops every packet on the link, both ways, until [`Host::mend`].
    pub fn cut(&self) {
        ip(&["link", "set", &self.link, "down"]).expect("cut the link");
    }

    /// Carries packets on the link again.
    pub fn mend(&self) {
        ip(&["link", "set", &self.link, "up"]).expect("mend the link");
    }

    /// Stops the process inside with SIGTERM, waiting up to `grace` before SIGKILL; true
    /// when it exited by itself with success.
    pub async fn stop(&mut self, grace: Duration) -> bool {
        let Some(mut child) = self.process.take() else {
            return false;
        };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for forward in &self.forwards {
            forward.abort();
        }
        // The peer end goes with the namespace, and the near end with its peer; a pair
        // whose peer never moved into the namespace (a failed start) goes by its near end.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.link]);
    }
}

/// Carries every connection accepted on `listener` to `server` (`host:port`); the
/// connections end with this task.
async fn forward(listener: tokio::net::TcpListener, server: String) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((mut inbound, _)) = listener.accept().await {
        let server = server.clone();
        connections.spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(server.as_str()).await {
                let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
        while connections.try_join_next().is_some() {}
    }
}
