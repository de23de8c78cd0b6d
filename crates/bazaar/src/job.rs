//! What `up` supervises: a process, as a command line with the sockets it inherits. `up`
//! builds one per role instance, `cluster` one per NATS node.

use std::os::fd::RawFd;

use tokio::process::Command;

/// A process `up` runs and restarts: a name for its log lines and a command line.
pub struct Job {
    /// `orders-1`, `nats-2`, ...
    pub name: String,
    /// The command, ready to spawn (stdout and stderr are piped by `up`).
    pub command: Command,
    /// Listening sockets `up` holds for it, passed as descriptors 3, 4, ...
    pub fds: Vec<RawFd>,
    /// Where `up` records the process id (roles record their own).
    pub pid_file: Option<std::path::PathBuf>,
}
