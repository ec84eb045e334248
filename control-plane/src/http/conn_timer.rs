//! hyper's header-read timer, one per connection. hyper asks its timer for a new sleep
//! for every request head it waits for and drops it once the head is in; with
//! `TokioTimer` that is a timer-wheel insert and removal (each under the wheel's lock)
//! for every request on a keep-alive connection — about 2 % of a cached verification.
//! Here each connection keeps one tokio `Sleep`: a request's sleep only records its own
//! deadline, and the connection's `Sleep` stays armed at the earliest deadline still
//! possible. When it fires before the waiting head's deadline (a later request's), it is
//! re-armed: one wheel operation per timeout period per connection instead of two per
//! request. The timeout itself is unchanged: a head that is not in by its deadline ends
//! the connection, as before.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};

/// One connection's timer (give each connection its own: a sleep is polled only by its
/// connection's task, so the lock is never contended).
#[derive(Clone)]
pub struct ConnectionTimer(Arc<Mutex<Pin<Box<tokio::time::Sleep>>>>);

impl ConnectionTimer {
    pub fn new() -> Self {
        // Not registered with the timer wheel until first polled; brought forward to the
        // first head's deadline then.
        let armed = tokio::time::sleep(Duration::from_secs(365 * 86_400));
        ConnectionTimer(Arc::new(Mutex::new(Box::pin(armed))))
    }
}

impl Timer for ConnectionTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    /// Tokio's clock (the same as `Instant::now()` unless a test pauses it).
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        Box::pin(HeadDeadline {
            armed: self.0.clone(),
            deadline,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadDeadline>() {
            Some(mut sleep) => sleep.deadline = new_deadline,
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// A request head's deadline, kept by its connection's one armed `Sleep`.
struct HeadDeadline {
    armed: Arc<Mutex<Pin<Box<tokio::time::Sleep>>>>,
    deadline: Instant,
}

impl Sleep for HeadDeadline {}

impl Future for HeadDeadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        // Armed later than this deadline (a connection's first head): bring it forward.
        if armed.deadline() > deadline {
            armed.as_mut().reset(deadline);
        }
        loop {
            match armed.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if tokio::time::Instant::now() >= deadline => {
                    return Poll::Ready(())
                }
                // It fired for an earlier head's deadline: wait on for this one.
                Poll::Ready(()) => armed.as_mut().reset(deadline),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    fn pending(sleep: &mut Pin<Box<dyn Sleep>>) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        sleep.as_mut().poll(&mut cx).is_pending()
    }

    async fn fires_after(sleep: Pin<Box<dyn Sleep>>) -> Duration {
        let start = tokio::time::Instant::now();
        sleep.await;
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn each_head_keeps_its_own_deadline() {
        let timer = ConnectionTimer::new();
        // A first head answered in time: its sleep is polled once, then dropped.
        let mut first = timer.sleep(Duration::from_secs(30));
        assert!(pending(&mut first));
        drop(first);
        // Ten seconds later the next head waits: it must get its whole 30 s, although
        // the connection's sleep is armed for the first head's deadline (20 s from now).
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            fires_after(timer.sleep(Duration::from_secs(30))).await,
            Duration::from_secs(30)
        );
        // And again after it fired (re-armed from elapsed).
        assert_eq!(
            fires_after(timer.sleep(Duration::from_secs(30))).await,
            Duration::from_secs(30)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_before_the_armed_one_is_kept() {
        let timer = ConnectionTimer::new();
        let mut long = timer.sleep(Duration::from_secs(30));
        assert!(pending(&mut long));
        drop(long);
        assert_eq!(
            fires_after(timer.sleep(Duration::from_secs(5))).await,
            Duration::from_secs(5)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reset_moves_the_deadline_without_a_new_sleep() {
        let timer = ConnectionTimer::new();
        let mut sleep = timer.sleep(Duration::from_secs(30));
        assert!(pending(&mut sleep));
        tokio::time::advance(Duration::from_secs(29)).await;
        timer.reset(&mut sleep, timer.now() + Duration::from_secs(30));
        assert!(sleep.as_mut().downcast_mut_pin::<HeadDeadline>().is_some());
        assert_eq!(fires_after(sleep).await, Duration::from_secs(30));
    }
}
