# QAToolBox's tools migration 0070 deletes the TimeCapsule model: tools_timecapsule is gone at
# HEAD. The optional legacy_capsules app creates it again for the older shape.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("tools", "0001_initial"),
    ]

    operations = [
        migrations.DeleteModel(
            name="TimeCapsule",
        ),
    ]
