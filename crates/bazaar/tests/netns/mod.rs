//! A host of its own for one process: a network namespace joined to this one by a veth pair,
//! with the loopback servers it needs (PostgreSQL, the NATS nodes) forwarded to the pair's
//! near address, and a link that can be cut (every packet dropped, no reset: what a
//! partition looks like to both ends) and mended. Needs root and iproute2's `ip`.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// A namespace, its link and its forwarders; everything is removed on drop.
pub struct Host {
    name: String,
    link: String,
    /// This side's address on the link: where the forwarded servers answer the host.
    pub near: Ipv4Addr,
    forwards: Vec<tokio::task::JoinHandle<()>>,
    process: Option<Child>,
}

/// Runs `ip ARGS`; the error says which command failed and what it printed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Host {
    /// Host number `index` (0–63, one subnet each), with `ports` on this side's loopback
    /// forwarded to the same ports at [`Host::near`]. `Err` says why no namespace could be
    /// made here (not root, no `ip`).
    pub async fn new(index: u8, ports: &[u16]) -> Result<Host, String> {
        let tag = format!("{}{index}", std::process::id() % 100_000);
        let mut host = Host {
            name: format!("bzcut{tag}"),
            link: format!("bzh{tag}"),
            near: Ipv4Addr::new(10, 213, index, 1),
            forwards: Vec::new(),
            process: None,
        };
        let (far, peer) = (format!("10.213.{index}.2/30"), format!("bzf{tag}"));
        let near = format!("{}/30", host.near);
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
        for &port in ports {
            let listener = tokio::net::TcpListener::bind((host.near, port))
                .await
                .map_err(|e| format!("forward {}:{port}: {e}", host.near))?;
            host.forwards.push(tokio::spawn(forward(listener, port)));
        }
        Ok(host)
    }

    /// Starts `program ARGS` inside, with exactly `env`, its output appended to `log`.
    pub fn spawn(&mut self, program: &str, args: &[&str], env: &[(String, String)], log: &Path) {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start the process inside");
        self.process = Some(child);
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
        // The peer end goes with the namespace, and the near end with its peer.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.link]);
    }
}

/// Carries every connection accepted on `listener` to `port` on this side's loopback; the
/// connections end with this task.
async fn forward(listener: tokio::net::TcpListener, port: u16) {
    let mut connections = tokio::task::JoinSet::new();
    while let Ok((mut inbound, _)) = listener.accept().await {
        connections.spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
        while connections.try_join_next().is_some() {}
    }
}
