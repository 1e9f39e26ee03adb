//! Lookups and attach retries against brokers played by the test over in-memory streams.

use std::time::Duration;

use magnetar_common::wire::{ErrorCode, Frame, PROTOCOL_VERSION};

use super::*;
use crate::transport::{FrameReader, FrameWriter, MemoryNet, MemoryStreams};

const TOPIC: &str = "persistent://public/default/t";

struct Stream {
    w: FrameWriter,
    r: FrameReader,
}

impl Stream {
    async fn accept(streams: &mut MemoryStreams) -> Stream {
        let (w, r) = streams.recv().await.expect("a stream");
        Stream { w, r }
    }
    async fn next(&mut self) -> Frame {
        self.r.next().await.expect("read").expect("a frame, not the end")
    }
    async fn send(&mut self, f: Frame) {
        self.w.write_frames(&[f]).await.expect("write");
    }
    /// Reads a Lookup for topic `t` and answers that `owner` serves it.
    async fn answer_lookup(streams: &mut MemoryStreams, owner: &str) {
        let mut s = Stream::accept(streams).await;
        assert_eq!(s.next().await, Frame::Lookup { topic: "t".into() });
        s.send(Frame::LookupResult { topic: TOPIC.into(), broker_url: owner.into(), http_url: String::new() }).await;
    }
    /// Reads a Producer request and answers `answer`.
    async fn answer_producer(streams: &mut MemoryStreams, answer: Frame) -> Stream {
        let mut s = Stream::accept(streams).await;
        assert!(matches!(s.next().await, Frame::Producer(_)));
        s.send(answer).await;
        s
    }
}

fn ready() -> Frame {
    Frame::ProducerReady { producer_name: "p-1".into(), topic: TOPIC.into(), max_message_bytes: 1 << 20 }
}

#[tokio::test]
async fn a_lookup_leads_to_the_owner() {
    let net = MemoryNet::default();
    let mut a = net.add("quic://a:1");
    let mut b = net.add("quic://b:2");
    let client = Client::in_memory_net("quic://a:1", &net, Duration::from_secs(60));
    let brokers = async {
        Stream::answer_lookup(&mut a, "quic://b:2").await;
        Stream::answer_producer(&mut b, ready()).await
    };
    let (p, _stream) = tokio::join!(client.producer("t").create(), brokers);
    let p = p.expect("create");
    assert_eq!(p.topic(), TOPIC);
    assert!(a.try_recv().is_err(), "the producer stream went to the owner only");
}

#[tokio::test]
async fn not_owner_on_attach_leads_to_a_new_lookup() {
    let net = MemoryNet::default();
    let mut a = net.add("quic://a:1");
    let mut b = net.add("quic://b:2");
    let client = Client::in_memory_net("quic://a:1", &net, Duration::from_secs(60));
    let brokers = async {
        Stream::answer_lookup(&mut a, "quic://b:2").await;
        let not_owner = Frame::Error { code: ErrorCode::NotOwner, message: "bundle moved to a".into() };
        Stream::answer_producer(&mut b, not_owner).await;
        // The bundle moved to a: the second lookup says so, and a serves the producer.
        Stream::answer_lookup(&mut a, "quic://a:1").await;
        Stream::answer_producer(&mut a, ready()).await
    };
    let (p, _stream) = tokio::join!(client.producer("t").create(), brokers);
    p.expect("create after a new lookup");
}

#[tokio::test]
async fn an_unreachable_bootstrap_broker_is_skipped_and_asked_last() {
    let net = MemoryNet::default();
    let mut a = net.add("quic://a:1");
    let client = Client::in_memory_net("quic://gone:1,a:1", &net, Duration::from_secs(60));
    let brokers = async {
        Stream::answer_lookup(&mut a, "quic://a:1").await;
        Stream::answer_producer(&mut a, ready()).await
    };
    let (p, _stream) = tokio::join!(client.producer("t").create(), brokers);
    p.expect("create through the second bootstrap broker");
    let order: Vec<String> = client.pool().bootstrap_order().iter().map(|u| u.to_string()).collect();
    assert_eq!(order, vec!["quic://a:1", "quic://gone:1"]);
}

#[tokio::test]
async fn a_broker_that_does_not_answer_lookups_serves_the_topic_itself() {
    let net = MemoryNet::default();
    let mut a = net.add("quic://a:1");
    let client = Client::in_memory_net("quic://a:1", &net, Duration::from_secs(60));
    let brokers = async {
        let mut s = Stream::accept(&mut a).await;
        s.next().await;
        let refusal = "a stream must start with Producer or Subscribe, not Lookup";
        s.send(Frame::Error { code: ErrorCode::BadRequest, message: refusal.into() }).await;
        Stream::answer_producer(&mut a, ready()).await
    };
    let (p, _stream) = tokio::join!(client.producer("t").create(), brokers);
    p.expect("create on the broker asked");
}

#[tokio::test]
async fn a_refusal_about_the_topic_is_not_retried() {
    let net = MemoryNet::default();
    let mut a = net.add("quic://a:1");
    let mut b = net.add("quic://b:1");
    let client = Client::in_memory_net("quic://a:1,b:1", &net, Duration::from_secs(60));
    let broker = async {
        let mut s = Stream::accept(&mut a).await;
        s.next().await;
        s.send(Frame::Error { code: ErrorCode::TopicNotFound, message: "no topic t".into() }).await;
    };
    let (p, ()) = tokio::join!(client.producer("t").create(), broker);
    assert_eq!(p.expect_err("refused"), Error::broker(ErrorCode::TopicNotFound, "no topic t"));
    assert!(a.try_recv().is_err() && b.try_recv().is_err(), "no second attempt, not even at b");
}

#[tokio::test]
async fn retries_stop_at_the_deadline_and_name_the_last_cause() {
    let net = MemoryNet::default();
    let mut a = net.add("quic://a:1");
    let client = Client::in_memory_net("quic://a:1", &net, Duration::from_millis(500));
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let broker = tokio::spawn({
        let attempts = attempts.clone();
        async move {
            while let Some((w, r)) = a.recv().await {
                let mut s = Stream { w, r };
                if let Frame::Lookup { .. } = s.next().await {
                    attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    s.send(Frame::Error { code: ErrorCode::ServiceUnavailable, message: "starting".into() }).await;
                }
            }
        }
    });
    let started = Instant::now();
    let e = client.producer("t").create().await.expect_err("gave up");
    broker.abort();
    let Error::Broker { code, message } = &e else { panic!("{e:?}") };
    assert_eq!(*code, ErrorCode::ServiceUnavailable);
    assert!(message.starts_with("create producer t: gave up after"), "{message}");
    assert!(message.ends_with(": starting"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert!(attempts.load(std::sync::atomic::Ordering::Relaxed) >= 2);
}

#[tokio::test]
async fn producer_busy_is_retried_only_when_reconnecting() {
    let net = MemoryNet::default();
    let mut a = net.add("quic://a:1");
    let client = Client::in_memory_net("quic://a:1", &net, Duration::from_secs(60));
    let request = Frame::Producer(magnetar_common::wire::ProducerRequest {
        protocol_version: PROTOCOL_VERSION,
        topic: "t".into(),
        producer_name: "p-1".into(),
    });
    let busy = || Frame::Error { code: ErrorCode::ProducerBusy, message: "producer p-1 is connected".into() };
    for reconnect in [false, true] {
        let spec = AttachSpec { topic: "t".into(), request: request.clone(), what: "attach", reconnect };
        let deadline = Instant::now() + Duration::from_secs(60);
        let brokers = async {
            Stream::answer_lookup(&mut a, "quic://a:1").await;
            Stream::answer_producer(&mut a, busy()).await;
            if reconnect {
                Stream::answer_lookup(&mut a, "quic://a:1").await;
                Some(Stream::answer_producer(&mut a, ready()).await)
            } else {
                None
            }
        };
        let (attached, _stream) = tokio::join!(attach(&client, &spec, deadline), brokers);
        match attached {
            Ok(a) => {
                assert!(reconnect);
                assert_eq!(a.attempts, 2);
            }
            Err(e) => {
                assert!(!reconnect);
                assert_eq!(e, Error::broker(ErrorCode::ProducerBusy, "producer p-1 is connected"));
            }
        }
    }
}

#[test]
fn backoff_doubles_up_to_the_cap_with_jitter() {
    let mut b = Backoff::default();
    let mut ceiling = BACKOFF_START;
    for _ in 0..10 {
        let d = b.next_delay();
        assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} not in [{:?}, {ceiling:?}]", ceiling / 2);
        ceiling = (ceiling * 2).min(BACKOFF_MAX);
    }
    assert_eq!(ceiling, BACKOFF_MAX);
}
