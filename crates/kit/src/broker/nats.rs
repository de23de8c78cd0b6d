//! NATS JetStream backend (being written).

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{Broker, BrokerError, Message, SubscribeOptions, Subscription};

/// The JetStream broker.
pub struct NatsBroker {
    client: async_nats::Client,
}

impl NatsBroker {
    /// Connects to `nats://HOST:PORT`.
    pub async fn connect(url: &str) -> Result<NatsBroker, BrokerError> {
        let client = async_nats::connect(url)
            .await
            .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        Ok(NatsBroker { client })
    }
}

impl Broker for NatsBroker {
    fn publish<'a>(&'a self, _topic: &'a str, _msg_id: &'a str, _body: Bytes) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { Err(BrokerError::Unavailable(format!("{:?}", self.client.connection_state()))) })
    }
    fn subscribe<'a>(&'a self, _t: &'a str, _g: &'a str, _o: SubscribeOptions) -> BoxFuture<'a, Result<Box<dyn Subscription>, BrokerError>> {
        Box::pin(async move { Err(BrokerError::Unavailable("todo".into())) })
    }
    fn read<'a>(&'a self, _t: &'a str, _l: usize) -> BoxFuture<'a, Result<Vec<Message>, BrokerError>> {
        Box::pin(async move { Ok(vec![]) })
    }
    fn delete<'a>(&'a self, _t: &'a str, _s: u64) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { Ok(()) })
    }
    fn pending<'a>(&'a self, _t: &'a str, _g: &'a str) -> BoxFuture<'a, Result<u64, BrokerError>> {
        Box::pin(async move { Ok(0) })
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(async move { Ok(()) })
    }
    fn kind(&self) -> &'static str {
        "nats"
    }
}
