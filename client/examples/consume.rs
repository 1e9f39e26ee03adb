//! Receives messages from a subscription, prints and acknowledges them.
//!
//! ```text
//! cargo run -p magnetar-client --example consume -- [URL] [TOPIC] [CERT] [COUNT] [SUBSCRIPTION]
//! ```
//! Each argument falls back to an environment variable, then a default: `MAGNETAR_URL`
//! (quic://127.0.0.1:6650), `MAGNETAR_TOPIC` (example), `MAGNETAR_TLS_TRUST_CERT`
//! (./data/tls/cert.pem), `MAGNETAR_COUNT` (10), `MAGNETAR_SUBSCRIPTION` (example-sub).

use magnetar_client::{Client, InitialPosition, SubscriptionType};

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
    let subscription = arg(5, "MAGNETAR_SUBSCRIPTION", "example-sub");

    let client = Client::builder(&url).tls_trust_cert(&cert).build().await?;
    let consumer = client
        .subscribe(&topic, &subscription)
        .subscription_type(SubscriptionType::Shared)
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await?;
    println!("consumer {} on {} ({subscription})", consumer.consumer_name(), consumer.topic());
    for _ in 0..count {
        let message = consumer.receive().await?;
        println!("{} {}", message.id, String::from_utf8_lossy(&message.payload));
        consumer.ack(&message.id)?;
    }
    // Sends the acknowledgements still grouped before closing.
    consumer.close().await?;
    client.close().await;
    Ok(())
}
