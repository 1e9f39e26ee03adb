//! Reads a topic from the start (or from a message id) and prints it, without a durable
//! subscription. Stops after 5 seconds without a new message.
//!
//! ```text
//! cargo run -p magnetar-client --example reader -- [URL] [TOPIC] [CERT] [START]
//! ```
//! Each argument falls back to an environment variable, then a default: `MAGNETAR_URL`
//! (quic://127.0.0.1:6650), `MAGNETAR_TOPIC` (example), `MAGNETAR_TLS_TRUST_CERT`
//! (./data/tls/cert.pem), `MAGNETAR_START` (earliest, latest or LEDGER:ENTRY[:INDEX]).

use std::time::Duration;

use magnetar_client::{Client, MessageId, StartPosition};

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
    let start = match arg(4, "MAGNETAR_START", "earliest").as_str() {
        "earliest" => StartPosition::Earliest,
        "latest" => StartPosition::Latest,
        id => StartPosition::MessageId(id.parse::<MessageId>()?),
    };

    let client = Client::builder(&url).tls_trust_cert(&cert).build().await?;
    let reader = client.reader(&topic).start_message_id(start).create().await?;
    while let Ok(next) = tokio::time::timeout(Duration::from_secs(5), reader.next()).await {
        let message = next?;
        println!("{} {}", message.id, String::from_utf8_lossy(&message.payload));
    }
    reader.close().await?;
    client.close().await;
    Ok(())
}
