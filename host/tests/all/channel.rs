//! Channel and bus basics used by mailboxes and topics.

use std::time::Duration;

use gorch_host::{Bus, BusError, Channel, RecvError, SendError};
use tokio_util::sync::CancellationToken;

use crate::common::run;

#[test]
fn close_drains_then_reports_closed_and_hands_values_back() {
    run(async {
        let ch: Channel<Vec<u8>> = Channel::new(2);
        ch.send(vec![1]).await.unwrap();
        ch.try_send(vec![2, 2]).unwrap();
        assert_eq!(ch.try_send(vec![3]), Err(SendError::Full(vec![3])));
        assert_eq!(ch.stats().approx_bytes, 3);
        ch.close();
        assert_eq!(ch.send(vec![4]).await, Err(SendError::Closed(vec![4])));
        assert_eq!(ch.recv().await, Ok(vec![1]));
        assert_eq!(ch.recv().await, Ok(vec![2, 2]));
        assert_eq!(ch.recv().await, Err(RecvError::Closed));
        let s = ch.stats();
        assert_eq!((s.sends, s.recvs, s.len, s.approx_bytes), (2, 2, 0, 0));
    })
}

#[test]
fn cancellation_wakes_blocked_send_and_recv() {
    // Causal only: each operation is polled until it waits (no sleep to get it there), is
    // woken by the cancellation, and its wait is timed; how long it took is the machine's
    // business.
    run(async {
        let ch: Channel<Vec<u8>> = Channel::new(1);
        let token = CancellationToken::new();
        let mut recv = Box::pin(ch.recv_cancellable(&token));
        assert!(futures::poll!(recv.as_mut()).is_pending(), "waits on an empty channel");
        token.cancel();
        assert_eq!(recv.await, Err(RecvError::Cancelled));

        // Room: no wait, nothing timed.
        ch.send(vec![0]).await.unwrap();
        assert_eq!(ch.stats().blocked_send_ns, 0);
        let token = CancellationToken::new();
        let mut send = Box::pin(ch.send_cancellable(vec![9], &token));
        assert!(futures::poll!(send.as_mut()).is_pending(), "waits on a full channel");
        token.cancel();
        assert_eq!(send.await, Err(SendError::Cancelled(vec![9])));
        let s = ch.stats();
        assert!(s.blocked_send_ns > 0 && s.blocked_recv_ns > 0, "{s:?}");
        assert_eq!(ch.try_recv(), Ok(vec![0]));
        assert_eq!(ch.recv_timeout(Duration::from_millis(10)).await, Err(RecvError::Timeout));
    })
}

#[test]
fn bus_topics_are_created_once_and_validated() {
    let bus: Bus<Vec<u8>> = Bus::with_max_topics(2);
    assert_eq!(bus.topic("a", 4).unwrap().cap(), 4);
    assert_eq!(bus.topic("a", 8).unwrap().cap(), 4);
    assert!(matches!(bus.topic("", 4), Err(BusError::InvalidName { .. })));
    assert!(matches!(bus.topic("has space", 4), Err(BusError::InvalidName { .. })));
    assert!(matches!(bus.topic(&"x".repeat(256), 4), Err(BusError::InvalidName { .. })));
    bus.topic("b", 4).unwrap();
    assert_eq!(bus.topic("c", 4).unwrap_err(), BusError::TooManyTopics { max: 2 });
    assert!(bus.remove("a"));
    assert_eq!(bus.topics().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), vec!["b"]);
}
