//! The consumer and the reader against a broker played by the test over in-memory streams.

use bytes::Bytes;
use magnetar_common::batch::{self, BatchBuilder, Compression};
use magnetar_common::wire::ErrorCode;
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::StartPosition;
use crate::transport::{FrameReader, FrameWriter};

const TOPIC: &str = "persistent://public/default/t";

struct FakeBroker {
    w: FrameWriter,
    r: FrameReader,
}

impl FakeBroker {
    async fn next(&mut self) -> Frame {
        self.r.next().await.expect("read").expect("a frame, not the end")
    }
    async fn send(&mut self, f: Frame) {
        self.w.write_frames(&[f]).await.expect("write");
    }
    /// Delivers entry `entry_id` of ledger 1 holding `n` messages `e<entry>m<i>`.
    async fn deliver(&mut self, entry_id: u64, n: u32, redelivery_count: u32) {
        let mut b = BatchBuilder::new();
        for i in 0..n {
            let m = batch::Message { payload: Bytes::from(format!("e{entry_id}m{i}")), ..Default::default() };
            b.push(&m).expect("push");
        }
        let payload = b.finish(Compression::Lz4, "prod", entry_id * 10, 5);
        self.send(Frame::Message { position: Position::new(1, entry_id), redelivery_count, payload }).await;
    }
}

type Streams = UnboundedReceiver<(FrameWriter, FrameReader)>;

/// Accepts a subscription, checks its request, answers ready and expects the first Flow.
async fn accept(streams: &mut Streams, check: impl FnOnce(&SubscribeRequest)) -> FakeBroker {
    let (w, r) = streams.recv().await.expect("a stream");
    let mut b = FakeBroker { w, r };
    let Frame::Subscribe(req) = b.next().await else { panic!("expected Subscribe") };
    check(&req);
    b.send(Frame::SubscribeReady { topic: TOPIC.into() }).await;
    assert!(matches!(b.next().await, Frame::Flow { .. }));
    b
}

/// A consumer, its broker, the client and the streams of later attachments.
async fn consumer(
    configure: impl FnOnce(ConsumerBuilder) -> ConsumerBuilder,
) -> (Consumer, FakeBroker, Client, Streams) {
    let (client, mut streams) = Client::in_memory(Duration::from_secs(60));
    let builder = configure(client.subscribe("t", "sub"));
    let (consumer, broker) = tokio::join!(builder.subscribe(), accept(&mut streams, |_| {}));
    (consumer.expect("subscribe"), broker, client, streams)
}

#[tokio::test]
async fn subscribe_grants_the_queue_then_acks_whole_entries() {
    let (client, mut streams) = Client::in_memory(Duration::from_secs(60));
    let builder = client
        .subscribe("t", "sub")
        .subscription_type(SubscriptionType::Shared)
        .initial_position(InitialPosition::Earliest)
        .consumer_name("c1")
        .priority(3)
        .receiver_queue_size(50);
    let broker = async {
        let (w, r) = streams.recv().await.expect("a stream");
        let mut b = FakeBroker { w, r };
        let Frame::Subscribe(req) = b.next().await else { panic!("expected Subscribe") };
        assert_eq!(
            req,
            SubscribeRequest {
                protocol_version: PROTOCOL_VERSION,
                topic: "t".into(),
                subscription: "sub".into(),
                subscription_type: SubscriptionType::Shared,
                initial_position: InitialPosition::Earliest,
                consumer_name: "c1".into(),
                priority: 3,
                durable: true,
                start: None,
                ack_timeout_ms: 0,
            }
        );
        b.send(Frame::SubscribeReady { topic: TOPIC.into() }).await;
        assert_eq!(b.next().await, Frame::Flow { permits: 50 });
        b
    };
    let (c, mut b) = tokio::join!(builder.subscribe(), broker);
    let c = c.expect("subscribe");
    assert_eq!(c.topic(), TOPIC);
    assert_eq!(c.consumer_name(), "c1");
    assert!(c.is_active());

    b.deliver(0, 2, 0).await;
    let m0 = c.receive().await.expect("message");
    let m1 = c.receive().await.expect("message");
    assert_eq!(m0.id, MessageId::new(1, 0, 0));
    assert_eq!(m1.payload, Bytes::from_static(b"e0m1"));
    assert_eq!(m1.sequence_id, 1);
    c.ack(&m1.id).expect("ack");
    c.ack(&m0.id).expect("ack");
    // Sent after the group time, on its own.
    assert_eq!(b.next().await, Frame::Ack { cumulative: false, positions: vec![Position::new(1, 0)] });
    let e = c.ack_cumulative(&m0.id).expect_err("shared");
    assert!(matches!(e, Error::InvalidArgument(_)));
}

#[tokio::test]
async fn permits_are_granted_again_after_half_the_queue() {
    let (c, mut b, _client, _s) = consumer(|b| b.receiver_queue_size(4)).await;
    b.deliver(0, 1, 0).await;
    b.deliver(1, 1, 0).await;
    c.receive().await.expect("message");
    c.receive().await.expect("message");
    assert_eq!(b.next().await, Frame::Flow { permits: 2 });
}

#[tokio::test]
async fn close_sends_pending_acks_then_finishes() {
    let (c, mut b, _client, _s) = consumer(|b| b.ack_group_time(Duration::from_secs(3600))).await;
    b.deliver(4, 1, 0).await;
    let m = c.receive().await.expect("message");
    c.ack(&m.id).expect("ack");
    let broker = async {
        assert_eq!(b.next().await, Frame::Ack { cumulative: false, positions: vec![Position::new(1, 4)] });
        assert_eq!(b.r.next().await.expect("read"), None, "finished after the acks");
    };
    let (closed, ()) = tokio::join!(c.close(), broker);
    closed.expect("close");
}

#[tokio::test]
async fn cumulative_acks_go_out_on_exclusive_subscriptions() {
    let (c, mut b, _client, _s) = consumer(|b| b.ack_group_time(Duration::ZERO)).await;
    b.deliver(0, 1, 0).await;
    b.deliver(1, 3, 0).await;
    let mut last = None;
    for _ in 0..3 {
        last = Some(c.receive().await.expect("message"));
    }
    let last = last.expect("received");
    assert_eq!(last.id, MessageId::new(1, 1, 1));
    c.ack_cumulative(&last.id).expect("cumulative");
    // Entry 1 is not complete: everything up to entry 0 is.
    assert_eq!(b.next().await, Frame::Ack { cumulative: true, positions: vec![Position::new(1, 0)] });
}

#[tokio::test]
async fn nack_asks_for_redelivery_after_the_delay() {
    let (c, mut b, _client, _s) = consumer(|b| b.nack_redelivery_delay(Duration::from_millis(1))).await;
    b.deliver(2, 2, 0).await;
    let m = c.receive().await.expect("message");
    c.nack(&m.id).expect("nack");
    assert_eq!(b.next().await, Frame::Redeliver { positions: vec![Position::new(1, 2)] });
    b.deliver(2, 2, 1).await;
    let again = c.receive().await.expect("message");
    assert_eq!((again.id, again.redelivery_count), (MessageId::new(1, 2, 0), 1));

    c.redeliver_unacknowledged().expect("redeliver");
    assert_eq!(b.next().await, Frame::Redeliver { positions: vec![] });
}

#[tokio::test]
async fn failover_consumers_follow_active_changes() {
    let (c, mut b, _client, _s) = consumer(|b| b.subscription_type(SubscriptionType::Failover)).await;
    assert!(!c.is_active());
    b.send(Frame::ActiveConsumerChange { active: true }).await;
    b.deliver(0, 1, 0).await;
    c.receive().await.expect("message");
    assert!(c.is_active(), "the change came before the message");
}

#[tokio::test]
async fn receive_returns_queued_messages_then_the_broker_error() {
    let (c, mut b, _client, mut streams) = consumer(|b| b).await;
    b.deliver(0, 2, 0).await;
    b.send(Frame::Error { code: ErrorCode::TopicNotFound, message: "topic deleted".into() }).await;
    assert!(c.receive().await.is_ok());
    assert!(c.receive().await.is_ok());
    assert_eq!(c.receive().await, Err(Error::broker(ErrorCode::TopicNotFound, "topic deleted")));
    assert!(c.ack(&MessageId::new(1, 0, 0)).is_err());
    assert_eq!(c.reconnects(), 0);
    assert!(streams.try_recv().is_err(), "a fatal error is not retried");
}

#[tokio::test]
async fn a_waiting_receive_wakes_when_reconnecting_gives_up() {
    let (client, mut streams) = Client::in_memory(Duration::from_millis(300));
    let (c, b) = tokio::join!(client.subscribe("t", "sub").subscribe(), accept(&mut streams, |_| {}));
    let c = c.expect("subscribe");
    // join! polls receive first, so it is waiting when the broker goes away for good.
    let end = async {
        tokio::task::yield_now().await;
        drop((b, streams));
    };
    let (received, ()) = tokio::join!(c.receive(), end);
    let e = received.expect_err("ended");
    assert!(
        matches!(&e, Error::Connect(m) if m.starts_with("reconnect consumer persistent://public/default/t: gave up after")),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_consumer_subscribes_again_grants_its_queue_and_keeps_its_acks() {
    let (client, mut streams) = Client::in_memory(Duration::from_secs(60));
    let builder = client
        .subscribe("t", "sub")
        .consumer_name("c1")
        .subscription_type(SubscriptionType::Failover)
        .receiver_queue_size(10)
        .ack_group_time(Duration::from_secs(3600));
    let mut first_request = None;
    let (c, b) = tokio::join!(builder.subscribe(), accept(&mut streams, |r| first_request = Some(r.clone())));
    let (c, mut b) = (c.expect("subscribe"), b);
    b.send(Frame::ActiveConsumerChange { active: true }).await;
    b.deliver(0, 1, 0).await;
    b.deliver(1, 2, 0).await;
    b.deliver(2, 1, 0).await;
    let m0 = c.receive().await.expect("e0m0");
    let m1 = c.receive().await.expect("e1m0");
    assert!(c.is_active());
    // e1m1 and e2m0 are queued, not yet received, when the stream goes.
    drop(b);
    // Acknowledged while disconnected (or just before the task notices): it waits.
    c.ack(&m0.id).expect("ack while reconnecting");

    let (w, r) = streams.recv().await.expect("a new stream");
    let mut b = FakeBroker { w, r };
    let Frame::Subscribe(again) = b.next().await else { panic!("expected Subscribe") };
    let first = first_request.expect("first request");
    assert_eq!(again, SubscribeRequest { topic: TOPIC.into(), ..first }, "the same subscription, name and type");
    b.send(Frame::SubscribeReady { topic: TOPIC.into() }).await;
    assert_eq!(b.next().await, Frame::Flow { permits: 10 }, "the whole queue: nothing is queued any more");
    assert_eq!(b.next().await, Frame::Ack { cumulative: false, positions: vec![Position::new(1, 0)] });
    assert!(!c.is_active(), "a failover consumer waits to be told again");
    // A new owner redelivers everything not acknowledged when it took over, e0 included (its
    // ack arrived before it delivered e0, so it ignored it).
    b.send(Frame::ActiveConsumerChange { active: true }).await;
    b.deliver(0, 1, 1).await;
    b.deliver(1, 2, 1).await;
    b.deliver(2, 1, 1).await;
    let again: Vec<MessageId> =
        [c.receive().await, c.receive().await, c.receive().await].into_iter().map(|m| m.expect("message").id).collect();
    assert_eq!(again, vec![MessageId::new(1, 1, 0), MessageId::new(1, 1, 1), MessageId::new(1, 2, 0)]);
    // The application acks e1m0 through the message it got before the reconnection.
    c.ack(&m1.id).expect("ack");
    c.ack(&again[1]).expect("ack");
    assert_eq!(c.reconnects(), 1);
    let broker = async {
        assert_eq!(
            b.next().await,
            Frame::Ack { cumulative: false, positions: vec![Position::new(1, 0), Position::new(1, 1)] },
            "e0 acknowledged again now that it was delivered, e1 complete"
        );
        assert_eq!(b.r.next().await.expect("read"), None);
    };
    let (closed, ()) = tokio::join!(c.close(), broker);
    closed.expect("close");
}

#[tokio::test]
async fn subscribe_reports_the_broker_refusal() {
    let (client, mut streams) = Client::in_memory(Duration::from_secs(60));
    let broker = async {
        let (w, r) = streams.recv().await.expect("a stream");
        let mut b = FakeBroker { w, r };
        b.next().await;
        b.send(Frame::Error { code: ErrorCode::ConsumerBusy, message: "exclusive subscription has a consumer".into() })
            .await;
    };
    let (c, ()) = tokio::join!(client.subscribe("t", "sub").subscribe(), broker);
    assert_eq!(
        c.expect_err("refused"),
        Error::broker(ErrorCode::ConsumerBusy, "exclusive subscription has a consumer")
    );
}

#[tokio::test]
async fn bad_settings_are_refused_before_connecting() {
    let (client, _streams) = Client::in_memory(Duration::from_secs(60));
    let e = client.subscribe("t", "bad name").subscribe().await.expect_err("subscription");
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("subscription name")), "{e:?}");
    let e = client.subscribe("t", "s").receiver_queue_size(0).subscribe().await.expect_err("queue");
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("receiver_queue_size")), "{e:?}");
}

#[tokio::test]
async fn a_reader_resumes_after_the_last_message_it_returned() {
    let (client, mut streams) = Client::in_memory(Duration::from_secs(60));
    let builder = client.reader("t").start_message_id(StartPosition::Earliest).receiver_queue_size(10);
    let mut subscription = String::new();
    let (reader, b) = tokio::join!(builder.create(), accept(&mut streams, |r| subscription = r.subscription.clone()));
    let (reader, mut b) = (reader.expect("reader"), b);
    b.deliver(5, 4, 0).await;
    b.deliver(6, 1, 0).await;
    assert_eq!(reader.next().await.expect("message").id, MessageId::new(1, 5, 0));
    assert_eq!(reader.next().await.expect("message").id, MessageId::new(1, 5, 1));
    drop(b);
    let check = |r: &SubscribeRequest| {
        assert_eq!(r.subscription, subscription);
        assert!(!r.durable);
        assert_eq!(r.start, Some(Position::new(1, 5)), "the entry of the last message returned");
    };
    let mut b = accept(&mut streams, check).await;
    b.deliver(5, 4, 0).await;
    b.deliver(6, 1, 0).await;
    let ids = [
        reader.next().await.expect("message").id,
        reader.next().await.expect("message").id,
        reader.next().await.expect("message").id,
    ];
    assert_eq!(ids, [MessageId::new(1, 5, 2), MessageId::new(1, 5, 3), MessageId::new(1, 6, 0)]);
    assert_eq!(reader.reconnects(), 1);
}

#[tokio::test]
async fn a_reader_starts_at_its_message_and_acks_entries_cumulatively() {
    let (client, mut streams) = Client::in_memory(Duration::from_secs(60));
    let builder = client.reader("t").start_message_id(StartPosition::MessageId(MessageId::new(1, 5, 2)));
    let check = |req: &SubscribeRequest| {
        assert!(req.subscription.starts_with("reader-"), "{}", req.subscription);
        assert!(!req.durable);
        assert_eq!(req.subscription_type, SubscriptionType::Exclusive);
        assert_eq!(req.start, Some(Position::new(1, 5)));
    };
    let (reader, b) = tokio::join!(builder.create(), accept(&mut streams, check));
    let (reader, mut b) = (reader.expect("reader"), b);
    b.deliver(5, 4, 0).await;
    let ids = [reader.next().await.expect("message").id, reader.next().await.expect("message").id];
    assert_eq!(ids, [MessageId::new(1, 5, 2), MessageId::new(1, 5, 3)]);
    assert_eq!(b.next().await, Frame::Ack { cumulative: true, positions: vec![Position::new(1, 5)] });
    let broker = async { assert_eq!(b.r.next().await.expect("read"), None) };
    let (closed, ()) = tokio::join!(reader.close(), broker);
    closed.expect("close");
}
