//! Waiting in tests: poll a condition until it holds, with a deadline that only bounds a hang.
//! Tests wait for conditions, never for fixed sleeps, and never assert on how long a wait took.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How long a test waits for something before it fails: generous, so that a slow or busy
/// machine does not fail a test that is right.
pub const WAIT: Duration = Duration::from_secs(60);

/// Pause between two polls.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Polls `f` until it returns `Some`, and returns that value; panics naming `what` once
/// `deadline` has passed. For a synchronous check: `|| std::future::ready(check())`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls `condition` until it holds; panics naming `what` once `deadline` has passed.
pub async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, deadline, || {
        let done = condition();
        async move { done.await.then_some(()) }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::future::ready;

    use super::*;

    #[tokio::test]
    async fn returns_the_first_value_and_polls_until_then() {
        let mut polls = 0;
        let v = wait_for("the third poll", WAIT, || {
            polls += 1;
            ready((polls == 3).then_some(polls * 10))
        })
        .await;
        assert_eq!((v, polls), (30, 3));
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 50ms waiting for nothing")]
    async fn fails_naming_what_it_waited_for() {
        wait_until("nothing", Duration::from_millis(50), || ready(false)).await;
    }
}
