//! confroll's chaos suite (see `docs/chaos.md`).
pub mod check;
pub mod cluster;
pub mod collect;
pub mod faults;
pub mod history;
pub mod k8s;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod records;
pub mod report;
pub mod scenario;
