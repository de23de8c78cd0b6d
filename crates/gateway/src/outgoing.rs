//! The body of a request to an upstream: bytes read whole from the client, which say when
//! the connection has taken the last of them, so the wait for the answer can switch from
//! Kong's `write_timeout` (sending) to its `read_timeout` (waiting to read).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

/// A whole request body that signals once it has been taken.
#[derive(Debug)]
pub(crate) struct OutgoingBody {
    data: Option<Bytes>,
    sent: Option<oneshot::Sender<()>>,
}

impl OutgoingBody {
    /// `data`, signalling nobody.
    pub fn new(data: Bytes) -> OutgoingBody {
        OutgoingBody {
            data: Some(data).filter(|d| !d.is_empty()),
            sent: None,
        }
    }

    /// `data`, and a receiver that resolves once the connection took the whole body.
    pub fn signalling(data: Bytes) -> (OutgoingBody, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut body = OutgoingBody::new(data);
        if body.data.is_some() {
            body.sent = Some(tx);
        } else {
            // Nothing to send: the request head alone goes out.
            let _ = tx.send(());
        }
        (body, rx)
    }
}

impl Body for OutgoingBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let frame = self.data.take().map(|d| Ok(Frame::data(d)));
        if frame.is_none() {
            if let Some(sent) = self.sent.take() {
                let _ = sent.send(());
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

impl Drop for OutgoingBody {
    fn drop(&mut self) {
        // A body dropped after its data was taken was sent as far as it will be.
        if self.data.is_none() {
            if let Some(sent) = self.sent.take() {
                let _ = sent.send(());
            }
        }
    }
}
