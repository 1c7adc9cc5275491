//! A daemon state to run the socket API against: a real config (parsed by the daemon's own
//! parser), a real sled store in a scratch directory and a held authinfo whose value the targets
//! look for in answers. Nothing refreshes: a `POST /v1/refresh?wait=true` waits out its bound on
//! the paused clock.

use std::sync::{Arc, OnceLock};

use authinfod::terminal::api::{self, ApiRequest, ApiResponse};
use authinfod::terminal::config;
use authinfod::terminal::state::State;
use authinfod::terminal::store::{HeldAuthinfo, Store};
use authinfod::units::WallClock;
use tokio_util::sync::CancellationToken;

/// The authinfo the fixture holds: a secret that must appear only where the contract serves it.
pub const SECRET: &str = "FUZZ-SECRET-AUTHINFO-5f1c0e";

/// The daemon's state and the shutdown token handed to `handle`.
#[derive(Debug)]
pub struct Fixture {
    pub state: Arc<State>,
    pub shutdown: CancellationToken,
}

/// The daemon config the fixture runs with, for a state directory under `dir`.
pub fn config_text(dir: &std::path::Path) -> String {
    format!(
        "device_id = \"T-FUZZ\"\nkey_file = \"{fixtures}/device.key\"\nstate_dir = \"{state}\"\n\n[proxy]\nurl = \"https://127.0.0.1:9\"\nca_file = \"{fixtures}/proxy-ca.pem\"\n\n[socket]\npath = \"{socket}\"\n",
        fixtures = crate::fixtures().display(),
        state = dir.join("state").display(),
        socket = dir.join("authinfod.sock").display(),
    )
}

/// The fixture, made once per process (inside the paused runtime, whose clock `State` uses).
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = crate::scratch_dir("daemon");
        let path = dir.join("authinfod.toml");
        let config = config::parse(&config_text(dir), &path)
            .unwrap_or_else(|e| panic!("the fixture config: {}", authinfod::error_chain(&e)));
        let (store, _) = Store::open(&config.state_dir).expect("the fixture store");
        let now = authinfod::units::unix_now();
        let held = HeldAuthinfo {
            authinfo: SECRET.into(),
            fetched_at: now - 60,
            expires_at: now + 7200,
            expires_in: Some(7260),
            proxy_fetched_at: None,
        };
        store.save_authinfo(&held).expect("store the held authinfo");
        let clock = Arc::new(WallClock::default());
        let state = crate::paused_runtime()
            .block_on(async { State::load(config, store, clock, Arc::default()) })
            .expect("the fixture store reads back");
        Fixture {
            state,
            shutdown: CancellationToken::new(),
        }
    })
}

/// Answers `req` with the fixture's state on the paused runtime.
pub fn handle(req: ApiRequest) -> ApiResponse {
    let f = fixture();
    crate::paused_runtime().block_on(api::handle(req, &f.state, &f.shutdown))
}
