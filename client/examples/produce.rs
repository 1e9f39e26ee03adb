//! Publishes messages and prints their ids.
//!
//! ```text
//! cargo run -p magnetar-client --example produce -- [URL] [TOPIC] [CERT] [COUNT]
//! ```
//! Each argument falls back to an environment variable, then a default: `MAGNETAR_URL`
//! (quic://127.0.0.1:6650), `MAGNETAR_TOPIC` (example), `MAGNETAR_TLS_TRUST_CERT`
//! (./data/tls/cert.pem, where a standalone broker writes its certificate), `MAGNETAR_COUNT` (10).

use magnetar_client::{Client, OutgoingMessage};

fn arg(position: usize, env: &str, default: &str) -> String {
    std::env::args().nth(position).or_else(|| std::env::var(env).ok()).unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let url = arg(1, "MAGNETAR_URL", "quic://127.0.0.1:6650");
    let topic = arg(2, "MAGNETAR_TOPIC", "example");
    let cert = arg(3, "MAGNETAR_TLS_TRUST_CERT", "./data/tls/cert.pem");
    let count: u32 = arg(4, "MAGNETAR_COUNT", "10").parse()?;

    let client = Client::builder(&url).tls_trust_cert(&cert).build().await?;
    let producer = client.producer(&topic).create().await?;
    println!("producer {} on {}", producer.name(), producer.topic());

    // Queue every message first (send_async waits only for room), then collect the receipts.
    let mut receipts = Vec::new();
    for i in 0..count {
        let message = OutgoingMessage::from(format!("hello {i}")).with_property("example", "produce");
        receipts.push(producer.send_async(message).await?);
    }
    for receipt in receipts {
        println!("stored {}", receipt.await?);
    }
    producer.close().await?;
    client.close().await;
    Ok(())
}
