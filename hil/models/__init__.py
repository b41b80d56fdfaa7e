"""Models the HIL puts around the firmware: simulated devices that speak real protocols.

Import the submodule you need (`from hil.models.sdm_meter import SdmMeterModel`); this
package imports nothing itself, so a model's dependencies load only when it is used.
"""
