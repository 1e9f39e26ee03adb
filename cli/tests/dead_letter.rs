//! Dead-letter topics against a real `magnetar standalone`: messages redelivered more than
//! `max_redeliveries` times (by nack or by the ack timeout) go to `<topic>-<subscription>-DLQ`
//! with their payload and origin properties, and are acknowledged on the original subscription.
//!
//! With `max_redeliveries = 2` a message reaches the application at most 3 times (redelivery
//! counts 0, 1 and 2); its next delivery is dead-lettered.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use magnetar_client::{
    Client, Consumer, DeadLetterPolicy, InitialPosition, PROPERTY_ORIGIN_MESSAGE_ID, PROPERTY_ORIGIN_SUBSCRIPTION,
    PROPERTY_REAL_TOPIC, ReceivedMessage, SubscriptionType,
};
use magnetar_common::testing::wait_until;
use support::{DEADLINE, StandaloneProc, http_get};

/// The backlog of `sub` on `public/default/<topic>`, from the admin API.
fn backlog(sa: &StandaloneProc, topic: &str, sub: &str) -> Option<u64> {
    let (status, body) = http_get(&sa.http, &format!("/admin/v1/topics/public/default/{topic}/stats"));
    if status != 200 {
        return None;
    }
    let stats: serde_json::Value = serde_json::from_str(&body).ok()?;
    stats["subscriptions"].as_array()?.iter().find(|s| s["name"] == sub)?["backlog"].as_u64()
}

async fn receive(consumer: &Consumer, what: &str) -> ReceivedMessage {
    tokio::time::timeout(DEADLINE, consumer.receive())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap_or_else(|e| panic!("receive {what}: {e}"))
}

/// Reads the dead-letter topic from the earliest message and returns its first message.
async fn first_dead_letter(client: &Client, dlq: &str) -> ReceivedMessage {
    let consumer = client
        .subscribe(dlq, "inspect")
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await
        .expect("subscribe to the dead-letter topic");
    let m = receive(&consumer, "the dead letter").await;
    consumer.ack(&m.id).expect("ack");
    consumer.close().await.expect("close");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_nacked_every_time_goes_to_the_dead_letter_topic_after_max_redeliveries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sa = StandaloneProc::start(&dir.path().join("data"));
    let client = Client::builder(&sa.url).tls_trust_cert(&sa.cert).build().await.expect("connect");
    let (topic, sub) = ("orders", "work");

    let consumer = client
        .subscribe(topic, sub)
        .subscription_type(SubscriptionType::Shared)
        .initial_position(InitialPosition::Earliest)
        .nack_redelivery_delay(Duration::from_millis(100))
        .dead_letter_policy(DeadLetterPolicy::new(2))
        .subscribe()
        .await
        .expect("subscribe");
    // One message per entry, so nacking "poison" redelivers nothing else.
    let producer = client.producer(topic).batching(false).create().await.expect("producer");
    let mut poison_id = None;
    for text in ["good-1", "poison", "good-2"] {
        let m = magnetar_client::OutgoingMessage::from(text).with_key("k1").with_property("kind", text);
        let id = producer.send(m).await.expect("send");
        if text == "poison" {
            poison_id = Some(id);
        }
    }
    producer.close().await.expect("close producer");

    // The application nacks "poison" every time and acknowledges the rest.
    let consumer = Arc::new(consumer);
    let deliveries: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let app = {
        let (consumer, deliveries) = (consumer.clone(), deliveries.clone());
        tokio::spawn(async move {
            while let Ok(m) = consumer.receive().await {
                let text = String::from_utf8_lossy(&m.payload).into_owned();
                deliveries.lock().expect("lock").entry(text.clone()).or_default().push(m.redelivery_count);
                if text == "poison" {
                    consumer.nack(&m.id).expect("nack");
                } else {
                    consumer.ack(&m.id).expect("ack");
                }
            }
        })
    };

    let dlq = format!("{topic}-{sub}-DLQ");
    let dead = first_dead_letter(&client, &dlq).await;
    assert_eq!(&dead.payload[..], b"poison");
    assert_eq!(dead.key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(dead.property("kind"), Some("poison"));
    assert_eq!(dead.property(PROPERTY_REAL_TOPIC), Some("persistent://public/default/orders"));
    assert_eq!(dead.property(PROPERTY_ORIGIN_SUBSCRIPTION), Some(sub));
    let poison_id = poison_id.expect("poison sent").to_string();
    assert_eq!(dead.property(PROPERTY_ORIGIN_MESSAGE_ID), Some(poison_id.as_str()));

    // Acknowledged on the original subscription once it was stored on the dead-letter topic.
    wait_until("the backlog of the original subscription to reach 0", DEADLINE, || async {
        backlog(&sa, topic, sub) == Some(0)
    })
    .await;
    {
        let d = deliveries.lock().expect("lock");
        assert_eq!(d.get("poison"), Some(&vec![0, 1, 2]), "max_redeliveries + 1 deliveries: {d:?}");
        assert_eq!(d.get("good-1"), Some(&vec![0]), "{d:?}");
        assert_eq!(d.get("good-2"), Some(&vec![0]), "{d:?}");
    }
    app.abort();
    let _ = app.await;
    Arc::try_unwrap(consumer).expect("the only handle").close().await.expect("close");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_never_acknowledged_goes_to_the_dead_letter_topic_through_the_ack_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sa = StandaloneProc::start(&dir.path().join("data"));
    let client = Client::builder(&sa.url).tls_trust_cert(&sa.cert).build().await.expect("connect");
    let (topic, sub) = ("payments", "slow");
    let dlq = "public/default/payments-dead";

    let consumer = client
        .subscribe(topic, sub)
        .initial_position(InitialPosition::Earliest)
        .ack_timeout(Duration::from_secs(1))
        .dead_letter_policy(DeadLetterPolicy::new(1).with_dead_letter_topic(dlq))
        .subscribe()
        .await
        .expect("subscribe");
    let producer = client.producer(topic).create().await.expect("producer");
    producer.send("forgotten").await.expect("send");
    producer.close().await.expect("close producer");

    // Received twice (redelivery counts 0 and 1), never acknowledged.
    for expected in 0..2 {
        let m = receive(&consumer, "the unacknowledged message").await;
        assert_eq!(&m.payload[..], b"forgotten");
        assert_eq!(m.redelivery_count, expected);
    }
    let dead = first_dead_letter(&client, dlq).await;
    assert_eq!(&dead.payload[..], b"forgotten");
    assert_eq!(dead.property(PROPERTY_REAL_TOPIC), Some("persistent://public/default/payments"));
    assert_eq!(dead.property(PROPERTY_ORIGIN_SUBSCRIPTION), Some(sub));
    wait_until("the backlog of the original subscription to reach 0", DEADLINE, || async {
        backlog(&sa, topic, sub) == Some(0)
    })
    .await;
    consumer.close().await.expect("close");
    client.close().await;
}
