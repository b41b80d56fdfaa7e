"""Field tools for technicians: build and flash firmware, commission a bus, DNO console."""
