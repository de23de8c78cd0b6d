//! Cross-process wake-ups for the embedded broker: every process that opens a bus file binds
//! a Unix datagram socket in `<bus file>.wake/`, and a publisher sends one byte to each after
//! its commit. A waiting fetch in another process then looks at once instead of at its next
//! poll. Losing a wake-up costs only latency (the poll remains as a fallback); sockets left by
//! killed processes are removed by the first publisher that finds them dead.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// How long a publisher trusts its list of peers before reading the directory again.
const PEERS_FRESH_FOR: Duration = Duration::from_secs(1);

/// This process's wake-up endpoint on one bus file.
pub(super) struct Wake {
    dir: PathBuf,
    own: PathBuf,
    sender: std::os::unix::net::UnixDatagram,
    peers: Mutex<(Instant, Vec<PathBuf>)>,
}

impl Wake {
    /// Binds this process's socket next to `bus_file` and wakes `notify` whenever a peer
    /// publishes. `None` when the platform or path does not allow it (polling still works).
    pub(super) fn bind(bus_file: &Path, notify: Arc<Notify>) -> Option<Arc<Wake>> {
        let dir = PathBuf::from(format!("{}.wake", bus_file.display()));
        std::fs::create_dir_all(&dir).ok()?;
        let own = dir.join(format!("{}-{}.sock", std::process::id(), uuid::Uuid::new_v4().simple()));
        let listener = tokio::net::UnixDatagram::bind(&own).ok()?;
        let sender = std::os::unix::net::UnixDatagram::unbound().ok()?;
        sender.set_nonblocking(true).ok()?;
        tokio::spawn(async move {
            let mut buf = [0u8; 16];
            while listener.recv(&mut buf).await.is_ok() {
                notify.notify_waiters();
            }
        });
        Some(Arc::new(Wake {
            dir,
            own,
            sender,
            peers: Mutex::new((Instant::now() - PEERS_FRESH_FOR, Vec::new())),
        }))
    }

    /// Tells every other process on this bus file that something was published.
    pub(super) fn publish(&self) {
        let peers = {
            let mut cached = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
            if cached.0.elapsed() >= PEERS_FRESH_FOR {
                let list = std::fs::read_dir(&self.dir)
                    .map(|entries| {
                        entries
                            .filter_map(|e| e.ok().map(|e| e.path()))
                            .filter(|p| p != &self.own && p.extension().is_some_and(|x| x == "sock"))
                            .collect()
                    })
                    .unwrap_or_default();
                *cached = (Instant::now(), list);
            }
            cached.1.clone()
        };
        for peer in peers {
            if let Err(e) = self.sender.send_to(&[1], &peer) {
                // Nobody listens there any more: a killed process's socket.
                if e.kind() == std::io::ErrorKind::ConnectionRefused || e.kind() == std::io::ErrorKind::NotFound {
                    let _ = std::fs::remove_file(&peer);
                }
            }
        }
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.own);
    }
}
