//! How a service's listener treats clients that stall: a thousand sockets trickling request
//! bodies are answered 408 and cut at the body timeout, while everyone else is served.

use std::time::{Duration, Instant};

use axum::{routing::post, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_trickling_bodies_to_a_service_are_cut_while_others_are_served() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = bazaar_kit::http::finish(Router::new().route("/echo", post(|body: String| async move { body })));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bazaar_kit::http::serve_plain(listener, router, "test", async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..1000 {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(b"POST /echo HTTP/1.1\r\nhost: s\r\ncontent-length: 1000\r\n\r\nsome")
            .await
            .unwrap();
        slow.push(socket);
    }
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let answer = client
            .post(format!("http://{addr}/echo"))
            .body("hello")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.text().await.unwrap(), "hello");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "normal requests waited");
    for socket in slow.iter_mut() {
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut answer))
            .await
            .expect("the service cut the slow client")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("application/problem+json"), "{answer}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= bazaar_kit::http::BODY_IDLE - Duration::from_secs(1),
        "cut after {waited:?}"
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_client_that_never_sends_its_head_is_cut_at_the_header_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = bazaar_kit::http::finish(Router::new());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bazaar_kit::http::serve_plain(listener, router, "test", async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(b"GET / HTTP/1.1\r\nhost:").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut rest))
        .await
        .expect("the service cut the silent client")
        .ok();
    assert!(started.elapsed() >= bazaar_kit::http::HEADER_TIMEOUT - Duration::from_secs(1));
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// A service being stopped (replaced by a rollout) answers a request on every connection it
/// accepted, even one whose request arrives just after the stop began: a client that opens a
/// connection per request (curl, urllib) must not see it closed without a response.
#[tokio::test]
async fn a_request_on_a_connection_accepted_before_the_stop_is_answered() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = bazaar_kit::http::finish(Router::new().route("/ok", axum::routing::get(|| async { "ok" })));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bazaar_kit::http::serve_plain(listener, router, "test", async {
        let _ = stopped.await;
    }));
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Accepted, then the stop begins before the request is sent.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(100)).await;
    socket
        .write_all(b"GET /ok HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("the connection is still open");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut answer))
        .await
        .expect("the connection ends after its answer")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
        "answered {answer:?}"
    );
    server.await.unwrap().unwrap();
}
