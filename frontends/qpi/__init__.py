"""The QPI front end: registration, the NNG session, the wire, the embedded stand-in."""
