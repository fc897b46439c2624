"""One file per schema version: ``evoprune_v<N>.py`` takes the tables from version N-1 to N."""
