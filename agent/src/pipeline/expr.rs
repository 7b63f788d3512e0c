//! CEL expressions over events: compile once, evaluate per event with the event's fields as
//! variables.
