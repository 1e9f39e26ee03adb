//! `magnetar produce` and `magnetar consume`: the client library from the command line.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use magnetar_benches::connect::ConnectArgs;
use magnetar_client::{Compression, InitialPosition, OutgoingMessage, SubscriptionType};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic: NAME, TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
    topic: String,
    /// Message values to send (repeatable). Without it, each line of standard input is a message.
    #[arg(long, short = 'm')]
    messages: Vec<String>,
    /// How many times to send each value.
    #[arg(short = 'n', long = "num-times", default_value_t = 1)]
    num_times: u64,
    /// Key of every message.
    #[arg(long, short = 'k')]
    key: Option<String>,
    /// Property of every message, as NAME=VALUE (repeatable).
    #[arg(long = "property", short = 'p', value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// Batch compression: none, lz4 or zstd.
    #[arg(long, default_value = "none")]
    compression: Compression,
    #[command(flatten)]
    connect: ConnectArgs,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("property {s:?} must look like NAME=VALUE"))
}

pub async fn produce(args: ProduceArgs) -> anyhow::Result<()> {
    let client = args.connect.connect().await?;
    let producer = client
        .producer(&args.topic)
        .compression(args.compression)
        .create()
        .await
        .with_context(|| format!("create a producer on {}", args.topic))?;
    // Receipts come back in send order; a printer task prints each line once it is stored.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(magnetar_client::SendReceipt, String)>(10_000);
    let printer = tokio::spawn(async move {
        let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
        let mut printed = 0u64;
        while let Some((receipt, payload)) = rx.recv().await {
            let id = receipt.await.with_context(|| format!("send message {payload:?}"))?;
            out.write_all(format!("{id}\t{payload}\n").as_bytes()).await?;
            printed += 1;
            if rx.is_empty() {
                out.flush().await?;
            }
        }
        out.flush().await?;
        anyhow::Ok(printed)
    });
    let message = |payload: &str| {
        let mut m = OutgoingMessage::new(payload.to_string());
        if let Some(k) = &args.key {
            m = m.with_key(k.clone());
        }
        for (k, v) in &args.properties {
            m = m.with_property(k.clone(), v.clone());
        }
        m
    };
    let send_result: anyhow::Result<()> = async {
        if args.messages.is_empty() {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Some(line) = lines.next_line().await.context("read standard input")? {
                for _ in 0..args.num_times {
                    let receipt = producer.send_async(message(&line)).await?;
                    if tx.send((receipt, line.clone())).await.is_err() {
                        return Ok(());
                    }
                }
            }
        } else {
            for _ in 0..args.num_times {
                for v in &args.messages {
                    let receipt = producer.send_async(message(v)).await?;
                    if tx.send((receipt, v.clone())).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let printed = printer.await.context("printer task")?;
    send_result?;
    let printed = printed?;
    producer.close().await.context("close the producer")?;
    client.close().await;
    tracing::debug!(printed, "produce done");
    Ok(())
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic: NAME, TENANT/NAMESPACE/NAME or persistent://TENANT/NAMESPACE/NAME.
    topic: String,
    /// Subscription name.
    #[arg(long, short = 's')]
    subscription: String,
    /// Stop after this many messages (0: run until interrupted).
    #[arg(short = 'n', long = "num-messages", default_value_t = 1)]
    num_messages: u64,
    /// Subscription type: exclusive, failover, shared or key_shared.
    #[arg(long = "type", short = 't', default_value = "exclusive")]
    subscription_type: SubscriptionType,
    /// Where a new subscription starts: earliest or latest.
    #[arg(long, default_value = "latest")]
    position: InitialPosition,
    /// Give up when no message arrives for this long (e.g. "30s"); exits non-zero if fewer than
    /// `-n` messages were consumed.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub async fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let client = args.connect.connect().await?;
    let consumer = client
        .subscribe(&args.topic, &args.subscription)
        .subscription_type(args.subscription_type)
        .initial_position(args.position)
        .subscribe()
        .await
        .with_context(|| format!("subscribe {} to {}", args.subscription, args.topic))?;
    eprintln!(
        "subscribed {} to {} ({}; a new subscription starts at the {} message); waiting for messages",
        args.subscription,
        args.topic,
        args.subscription_type,
        match args.position {
            InitialPosition::Earliest => "earliest",
            InitialPosition::Latest => "latest",
        }
    );
    let mut out = tokio::io::stdout();
    let mut consumed = 0u64;
    while args.num_messages == 0 || consumed < args.num_messages {
        let next = match args.timeout {
            Some(t) => match tokio::time::timeout(t, consumer.receive()).await {
                Ok(r) => r,
                Err(_) if args.num_messages == 0 => break,
                Err(_) => {
                    consumer.close().await.ok();
                    bail!(
                        "timed out: no message for {}; consumed {consumed} of {}",
                        humantime::format_duration(t),
                        args.num_messages
                    );
                }
            },
            None => consumer.receive().await,
        };
        let message = next.context("receive")?;
        let mut line = message.payload.to_vec();
        line.push(b'\n');
        out.write_all(&line).await.context("write to standard output")?;
        out.flush().await.context("write to standard output")?;
        consumer.ack(&message.id).context("acknowledge")?;
        consumed += 1;
    }
    consumer.close().await.context("close the consumer")?;
    client.close().await;
    Ok(())
}
