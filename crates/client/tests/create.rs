//! `Client::create` under a lost answer: a proxy in front of the real server lets the first
//! create through, waits for the server's answer and then cuts the connection without passing
//! it on, as a dropped link or a crashed load balancer would. The client retries with the same
//! `Idempotency-Key`, and there is exactly one container.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use drover_client::Client;
use drover_test_support::{ADMIN_ACCESS as ACCESS, ADMIN_SECRET as SECRET, servers};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards connections to `upstream`; the first one's answer is swallowed.
async fn lossy_proxy(upstream: std::net::SocketAddr, swallowed: Arc<AtomicUsize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut client, _)) = listener.accept().await {
            let mut server = TcpStream::connect(upstream).await.unwrap();
            if std::mem::take(&mut first) {
                let swallowed = swallowed.clone();
                tokio::spawn(async move {
                    let (mut client_read, _client_write) = client.split();
                    let (mut server_read, mut server_write) = server.split();
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut answer = [0u8; 1];
                    // Pass the request on until the server starts to answer, then hang up.
                    loop {
                        tokio::select! {
                            read = client_read.read(&mut buf) => {
                                let n = read.unwrap_or(0);
                                if n == 0 { return; }
                                server_write.write_all(&buf[..n]).await.unwrap();
                            }
                            read = server_read.read(&mut answer) => {
                                if read.unwrap_or(0) > 0 {
                                    swallowed.fetch_add(1, Ordering::SeqCst);
                                }
                                return;
                            }
                        }
                    }
                });
            } else {
                tokio::spawn(async move {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_retried_without_a_duplicate() {
    for test in servers(&[]).await {
        let server = &test.server;
        let swallowed = Arc::new(AtomicUsize::new(0));
        let url = lossy_proxy(server.addr, swallowed.clone()).await;
        let client = Client::new(&url, ACCESS, SECRET).unwrap();

        let body = json!({"name": "once", "command": ["sleep", "1"]});
        let created = client.create("containers", &body).await.unwrap();
        assert_eq!(
            swallowed.load(Ordering::SeqCst),
            1,
            "the first answer was lost after the server sent it"
        );
        let list = client.get("containers?name=once").await.unwrap();
        let data = list["data"].as_array().unwrap();
        assert_eq!(data.len(), 1, "one container, not one per send: {list:#}");
        assert_eq!(data[0]["id"], created["id"]);

        // Without the key, the same loss makes a second container: what the key is for.
        let plain = Client::new(
            &lossy_proxy(server.addr, Arc::new(AtomicUsize::new(0))).await,
            ACCESS,
            SECRET,
        )
        .unwrap();
        let body = json!({"name": "twice", "command": ["sleep", "1"]});
        assert!(plain.post("containers", &body).await.is_err());
        plain.post("containers", &body).await.unwrap();
        let list = client.get("containers?name=twice").await.unwrap();
        assert_eq!(list["data"].as_array().unwrap().len(), 2);
    }
}
