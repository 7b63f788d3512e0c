//! The sources: where events enter the agent. [`http`] serves trackers (generic JSON, Snowplow,
//! Segment), [`mqtt_subscriber`] subscribes to brokers, [`mqtt_listener`] is an MQTT server that
//! devices publish to directly. Each decodes with [`crate::decode`], runs the pipeline and
//! acknowledges only what the buffer committed.
//!
//! Sources never read or change the buffer's contents beyond appending (and looking up delivery
//! marks), and never talk to the uplink.

pub mod http;
pub mod mqtt_listener;
pub mod mqtt_subscriber;
