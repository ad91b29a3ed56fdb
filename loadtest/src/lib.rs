//! `habar-load`: the load tester SREs drive against a Habar cluster.
//!
//! - [`scenario`]: scenario files and their validation.
//! - [`workload`]: conversation popularity, ciphertext sizes, send times.
//! - [`openloop`]: open-loop scheduling without coordinated omission.
//! - [`stats`]: HDR histograms per operation, per second and for the run.
//! - [`run`]: closed loop, open loop and ramp through `habar-client`, subscribers, verify.
//! - [`verify`]: the read-back check of every acknowledged envelope.
//! - [`report`], [`plot`]: the table, JSON and SVG outputs.
//! - [`spawn`]: `--spawn N` local clusters; [`cpu`]: their CPU time in the measured window.
//! - [`chaos`]: `habar-chaos`, the fault-injection runner and its history checker.

pub mod chaos;
pub mod cpu;
pub mod openloop;
pub mod plot;
pub mod ramp;
pub mod report;
pub mod run;
pub mod scenario;
pub mod spawn;
pub mod stats;
pub mod verify;
pub mod workload;
