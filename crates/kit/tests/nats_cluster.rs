//! The NATS backend on a three-node JetStream cluster of its own (nats-server processes on
//! free loopback ports, stores in a temp dir, all killed at the end): with `?replicas=3`,
//! SIGKILLing the node that leads a topic's stream in the middle of the traffic costs
//! retries, never an acked message, and a retried publish is stored once.
//!
//! Needs the `nats-server` binary (Debian package `nats-server`), which the machine's own
//! NATS service already comes from.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use bazaar_kit::broker::{self, nats::stream_name, SharedBroker, SubscribeOptions};
use bytes::Bytes;

const TOPIC: &str = "cluster.orders";
const GROUP: &str = "cluster-test";

/// One nats-server process of the cluster.
struct Node {
    name: String,
    port: u16,
    child: Child,
}

/// Three nodes forming one JetStream cluster; killed on drop.
struct Cluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

fn nats_server() -> PathBuf {
    bazaar_kit::broker::nats::server_binary()
        .expect("this test needs the nats-server binary (Debian package `nats-server`)")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = nats_server();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster)| format!("nats-route://127.0.0.1:{cluster}"))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, cluster))| {
                let name = format!("n{i}");
                let log = std::fs::File::create(dir.path().join(format!("{name}.log"))).expect("log");
                let child = Command::new(&bin)
                    .args(["-n", &name, "-a", "127.0.0.1", "-p", &port.to_string(), "-js"])
                    .arg("-sd")
                    .arg(dir.path().join(&name))
                    .args(["--cluster_name", "bazaar-test"])
                    .args(["--cluster", &format!("nats://127.0.0.1:{cluster}")])
                    .args(["--routes", &routes.join(",")])
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(log))
                    .spawn()
                    .expect("start nats-server");
                Node { name, port, child }
            })
            .collect();
        Cluster { nodes, _dir: dir }
    }

    fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("nats://{}?replicas=3", seeds.join(","))
    }

    fn logs(&self, dir: &Path) -> String {
        self.nodes
            .iter()
            .map(|n| std::fs::read_to_string(dir.join(format!("{}.log", n.name))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Connects once the cluster has formed and can create a replicated stream.
    async fn broker(&self) -> SharedBroker {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(broker) = broker::connect(&self.url()).await {
                if broker
                    .publish(TOPIC, "warm-up", Bytes::from_static(b"{}"))
                    .await
                    .is_ok()
                {
                    return broker;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not form:\n{}",
                self.logs(self._dir.path())
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `topic`'s stream as any live node describes it now.
    async fn stream_info(&self) -> async_nats::jetstream::stream::Info {
        let seeds: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port).parse().expect("addr"))
            .collect();
        let js = async_nats::jetstream::new(async_nats::connect(seeds).await.expect("connect"));
        let mut stream = js.get_stream(stream_name(TOPIC)).await.expect("the stream");
        stream.info().await.expect("stream info").clone()
    }

    /// The name of the node that leads `topic`'s stream now.
    async fn leader(&self) -> String {
        self.stream_info()
            .await
            .cluster
            .and_then(|c| c.leader)
            .expect("a replicated stream has a leader")
    }

    /// How many messages `topic`'s stream holds.
    async fn stored(&self) -> u64 {
        self.stream_info().await.state.messages
    }

    fn kill(&mut self, name: &str) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("a node of the cluster");
        node.child.kill().expect("kill the node");
        let _ = node.child.wait();
    }
}

/// Publishes until the broker acks it (a failover in progress answers with errors meanwhile).
async fn publish_until_acked(broker: &SharedBroker, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match broker.publish(TOPIC, id, Bytes::from(id.to_string())).await {
            Ok(()) => return,
            Err(e) => {
                assert!(Instant::now() < deadline, "{id} was never acked: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_stream_leader_costs_retries_never_an_acked_message() {
    let mut cluster = Cluster::start();
    let broker = cluster.broker().await;
    let options = SubscribeOptions {
        ack_wait: Duration::from_secs(5),
    };
    let mut sub = broker.subscribe(TOPIC, GROUP, options).await.expect("subscribe");

    let ids: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    for id in &ids[..150] {
        publish_until_acked(&broker, id).await;
    }
    let leader = cluster.leader().await;
    cluster.kill(&leader);
    for id in &ids[150..] {
        publish_until_acked(&broker, id).await;
    }
    // A publish retried across the failover is stored once (Nats-Msg-Id de-duplication).
    publish_until_acked(&broker, &ids[10]).await;

    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < ids.len() + 1 {
        assert!(
            Instant::now() < deadline,
            "only {} of {} messages came back after the leader {leader} died",
            seen.len(),
            ids.len() + 1
        );
        let batch = match sub.fetch(50, Duration::from_millis(500)).await {
            Ok(batch) => batch,
            // The consumer's leader may be moving too: ask again.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for delivery in batch {
            let id = delivery.message.msg_id.clone();
            if delivery.ack().await.is_ok() {
                seen.insert(id);
            }
        }
    }
    let expected: HashSet<String> = ids.iter().cloned().chain(["warm-up".to_string()]).collect();
    assert_eq!(seen, expected, "every acked publish was delivered");
    assert_eq!(
        cluster.stored().await,
        expected.len() as u64,
        "each message is stored once, retried or not"
    );
    assert_ne!(cluster.leader().await, leader, "the stream moved to another leader");
}
