//! An agent on a thread of its own, for the demo and the end-to-end tests.
use super::{
    drain::EventDrain,
    run::{Agent, AgentError},
    settings::AgentSettings,
    state::{SharedState, State},
};

/// An agent running on a thread of its own, with its own runtime: for the
/// demo and the end-to-end tests, which drive a workload meanwhile.
pub struct BackgroundAgent {
    events: EventDrain,
    api_addr: Option<std::net::SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundAgent {
    pub fn start(settings: AgentSettings) -> Result<Self, AgentError> {
        Ok(Self::run(Agent::start(settings)?))
    }

    /// Runs an agent already started.
    pub fn run(agent: Agent) -> Self {
        let events = agent.events();
        let api_addr = agent.api_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("memtrace-agent".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a current-thread runtime");
                runtime.block_on(agent.run(async move {
                    let _ = stopped.await;
                }));
            })
            .expect("spawn the agent thread");
        Self {
            events,
            api_addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn state(&self) -> SharedState {
        self.events.state()
    }

    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.api_addr
    }

    /// Runs `f` on the agent's state, with every event the kernel has
    /// submitted so far handled.
    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.events.current())
    }

    /// Stops the agent and waits until every program is detached.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for BackgroundAgent {
    fn drop(&mut self) {
        self.shutdown();
    }
}
